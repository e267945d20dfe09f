"""The tiled VAE engines behind every family's codec: which one runs, with one interface (gigadiff.vae.plan).

A model family names its VAE's engine in its facts (`ModelInfo.vae_engine`); the codec builds it from ENGINES.

- `groupnorm` (gigadiff.vae.tiled): AutoencoderKL families (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2, Z-Image).
  exact: layer by layer over the whole image with whole-image GroupNorm statistics and attention, equal to an
  untiled decode; fast: the whole image while it fits, else streamed tiles with statistics from a downsampled
  pass. `--vae-memory` bounds one tile of one layer (exact), a tile through the network and the whole-image
  prefix (fast); `--vae-spill` holds exact mode's whole-image buffers in memory-mapped files.
- `halo` (gigadiff.vae.halo): VAEs without image-wide statistics (Qwen-Image's, SANA's DC-AE). Tiles with a
  halo of the measured reach, each attention summarised over the whole image: every key (exact), softmax keys
  pooled to MAX_KEYS (fast). `--vae-memory` bounds a tile's crop through the network with the attention
  summaries; `--vae-spill` is refused (no whole-image buffers to spill).

Pixel-space models (terrain) have no engine (`none`): their codec converts the canvas itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gigadiff.events import Listener
from gigadiff.vae.halo import HaloTiledVAE
from gigadiff.vae.plan import Engine
from gigadiff.vae.tiled import TiledVAE
from gigadiff.vae.tiling import VaeTiling

EngineFactory = Callable[[Any, VaeTiling, Listener | None, Any], Engine]
"""(the VAE module, its tiling, the listener, what the family describes of it: the halo engine's networks)."""

ENGINES: dict[str, EngineFactory] = {
    "groupnorm": lambda vae, tiling, listener, networks: TiledVAE(vae, tiling, listener),
    "halo": lambda vae, tiling, listener, networks: HaloTiledVAE(vae, networks[0], networks[1], tiling, listener),
}
"""Every engine, by the name families declare (gigadiff.facts.VaeEngine)."""
