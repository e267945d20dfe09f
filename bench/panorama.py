"""Benchmark: 512x2048 text-to-image, gigadiff defaults vs diffusers' StableDiffusionPanoramaPipeline defaults.

One tiny SD model (seeded random weights, saved and loaded through from_pretrained like a hub model), 4 DDIM
steps, guidance 7.5, on the CPU, both runs in this one process so that the ratios compare like with like.
Counts every UNet call with a forward hook and the latent pixels each call evaluates (classifier-free
guidance's doubled batch counted once). Both sides decode to a PIL image.

    python bench/panorama.py [--repeats 3] [--json bench/results/panorama.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models: tests/helpers/tiny.py

PROMPT = "a wide mountain valley at sunrise"
HEIGHT, WIDTH, STEPS, GUIDANCE, SEED = 512, 2048, 4, 7.5, 0


class UNetCounter:
    """Counts UNet calls and the latent pixels they evaluate, via a forward pre-hook."""

    def __init__(self, unet: Any, cfg: bool):
        self.calls = 0
        self.pixels = 0
        self.cfg = cfg
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple) -> None:
        x = args[0]
        self.calls += 1
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1] // (2 if self.cfg else 1)

    def reset(self) -> None:
        self.calls = self.pixels = 0


def run_panorama(folder: Path, repeats: int) -> dict[str, Any]:
    from diffusers import StableDiffusionPanoramaPipeline

    pipe = StableDiffusionPanoramaPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    counter = UNetCounter(pipe.unet, cfg=True)

    def once(output_type: str) -> None:
        pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             generator=torch.Generator("cpu").manual_seed(SEED), output_type=output_type)  # fmt: skip

    return measure(once, counter, repeats)


def run_gigadiff(folder: Path, repeats: int) -> dict[str, Any]:
    import gigadiff

    backend = gigadiff.open_backend(str(folder), device="cpu")
    counter = UNetCounter(backend.unet, cfg=True)
    fields = {"size": f"{WIDTH}x{HEIGHT}", "steps": STEPS, "guidance": GUIDANCE, "seed": SEED, "scheduler": "ddim"}

    def once(output_type: str) -> None:
        from gigadiff.api import result_image

        result = gigadiff.generate_result(PROMPT, model=backend, **fields)
        if output_type == "pil":
            result_image(result)

    result = measure(once, counter, repeats)
    resolved = gigadiff.generate_result(PROMPT, model=backend, **fields).settings
    result["settings"] = {k: getattr(resolved, k) for k in ("tile", "overlap", "weights", "shift", "tile_batch")}
    return result


def measure(once: Any, counter: UNetCounter, repeats: int) -> dict[str, Any]:
    """Median wall time end to end (to a PIL image) and for denoising alone (to latents)."""
    once("pil")  # warm-up: first-call allocations and kernel selection
    report: dict[str, Any] = {}
    for output_type, key in (("pil", "wall_s"), ("latent", "denoise_s")):
        times = []
        for _ in range(repeats):
            counter.reset()
            start = time.perf_counter()
            once(output_type)
            times.append(time.perf_counter() - start)
        report[key] = statistics.median(times)
        report[key.replace("_s", "_all_s")] = times
    canvas = (HEIGHT // 8) * (WIDTH // 8)
    report["unet_calls"] = counter.calls
    report["latent_pixels_per_canvas_pixel"] = counter.pixels / (STEPS * canvas)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "panorama.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from tests.helpers.tiny import save_tiny, tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny(tiny_sd_pipeline(seed=0), Path(tmp) / "tiny-sd")
        panorama = run_panorama(folder, args.repeats)
        ours = run_gigadiff(folder, args.repeats)

    speedup = panorama["wall_s"] / ours["wall_s"]
    denoise_speedup = panorama["denoise_s"] / ours["denoise_s"]
    rows = [("diffusers panorama", panorama), ("gigadiff", ours)]
    print(f"512x2048, tiny SD, {STEPS} DDIM steps, guidance {GUIDANCE}, CPU threads {torch.get_num_threads()}")
    print(f"{'method':<20} {'wall s':>8} {'denoise s':>10} {'UNet calls':>11} {'latent px / canvas px':>22}")
    for name, r in rows:
        print(f"{name:<20} {r['wall_s']:>8.2f} {r['denoise_s']:>10.2f} {r['unet_calls']:>11} "
              f"{r['latent_pixels_per_canvas_pixel']:>22.3f}")  # fmt: skip
    print(f"speed-up gigadiff vs panorama: {speedup:.2f}x end to end, {denoise_speedup:.2f}x denoising alone "
          f"(target >= 4x); gigadiff evaluates {ours['latent_pixels_per_canvas_pixel']:.3f} latent px per "
          "canvas px (target <= 1.3)")  # fmt: skip
    report = {
        "benchmark": "panorama",
        "size": [HEIGHT, WIDTH],
        "steps": STEPS,
        "guidance": GUIDANCE,
        "torch_threads": torch.get_num_threads(),
        "panorama": panorama,
        "gigadiff": ours,
        "speedup": speedup,
        "denoise_speedup": denoise_speedup,
        "targets_met": speedup >= 4 and ours["latent_pixels_per_canvas_pixel"] <= 1.3,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
