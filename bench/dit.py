"""Benchmark: a FLUX-shaped DiT on a large canvas, tiled by gigadiff against FluxPipeline on the whole canvas.

The transformer is FLUX.1's architecture at a width where attention dominates, as in the real model at these
sizes (attention costs 4 T² d per layer, its MLP 16 T d²: with d = 64 attention is T / 256 times the MLP, 16x
at 1024²), seeded random weights, CPU, 4 steps, embedded guidance, latents only (the VAE is bench/vae.py's).
gigadiff runs plain synchronized tiles (`coherence none`) of 1024 px with its default 128 px overlap; both
methods count their transformer calls. Every row runs in a fresh process, which reports its wall time and
peak RSS; whole-canvas rows only where they fit in RAM. The first pair is one tile: its latents must be equal.
Table plus JSON.

    python bench/dit.py [--sizes 1024 2048 4096] [--whole-max 4096] [--json bench/results/dit.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models: tests/helpers/tiny.py

STEPS, PROMPT, SEED, TILE = 4, "a mountain village at dawn", 7, 1024


def build(folder: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from tests.helpers.tiny import evaluating, save_tiny, tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                              attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                              pooled_projection_dim=32, guidance_embeds=True,
                                              axes_dims_rope=(8, 12, 12))  # fmt: skip
    save_tiny(evaluating(pipe), folder)


def row(method: str, folder: str, size: int, out: str) -> None:
    """One measurement, in this (fresh) process."""
    import torch

    from tests.helpers.tiny import load_saved

    pipe = load_saved(folder)
    calls = [0]
    forward = pipe.transformer.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    pipe.transformer.forward = counted
    start = time.perf_counter()
    if method == "diffusers":
        from gigadiff.backends.flow import unpack

        packed = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=STEPS, guidance_scale=3.5,
                      generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").images  # fmt: skip
        latents = unpack(packed, size // 8, size // 8)
    else:
        from gigadiff.api import generate

        latents = generate(PROMPT, model=pipe, size=f"{size}x{size}", steps=STEPS, guidance=3.5, seed=SEED,
                           tile=TILE, coherence="none", output_type="latent")  # fmt: skip
    wall = time.perf_counter() - start
    torch.save(latents, out + ".pt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB
    Path(out).write_text(json.dumps({"wall_s": wall, "peak_gb": peak, "model_calls": calls[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--whole-max", type=int, default=4096, help="largest size run whole by FluxPipeline")
    parser.add_argument("--json", type=Path, default=Path("bench/results/dit.json"))
    parser.add_argument("--row", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        row(args.row[0], args.row[1], int(args.row[2]), args.row[3])
        return
    import torch

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dit"
        build(folder)
        print(f"{'size':>6} {'method':<10} {'wall s':>8} {'peak GB':>8} {'calls':>6}")
        for size in args.sizes:
            latents = {}
            for method in ("diffusers", "gigadiff"):
                if method == "diffusers" and size > args.whole_max:
                    continue
                out = str(Path(tmp) / f"{method}-{size}.json")
                command = [sys.executable, __file__, "--row", method, str(folder), str(size), out]
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{size:>6} {method:<10} failed: {proc.stderr.strip().splitlines()[-1][:100]}")
                    results.append({"size": size, "method": method, "error": proc.stderr[-2000:]})
                    continue
                r = {"size": size, "method": method, **json.loads(Path(out).read_text())}
                latents[method] = torch.load(out + ".pt")
                results.append(r)
                print(f"{size:>6} {method:<10} {r['wall_s']:>8.1f} {r['peak_gb']:>8.2f} {r['model_calls']:>6}")
            if len(latents) == 2:
                diff = float((latents["diffusers"] - latents["gigadiff"]).abs().max())
                results.append({"size": size, "max_latent_difference": diff})
                print(f"{size:>6} max |gigadiff - diffusers| = {diff:.2e}" + (" (one tile)" if size <= TILE else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
