"""Workflows built on the sampler: text-to-image now; img2img, regions and coherence to come."""
