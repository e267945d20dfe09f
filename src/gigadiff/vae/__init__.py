"""Latent <-> pixel conversion through a model's VAE."""
