"""Workflows built on the sampler: text-to-image and img2img (txt2img), progressive coherence (coherence), with
regional prompts (regional) as layers of either; each receives one run context (context)."""
