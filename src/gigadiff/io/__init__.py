"""Writing results: images with embedded parameters, sidecars and latents, never clobbering by accident."""
