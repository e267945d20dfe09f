"""Benchmark: seams on a real pretrained model — adaptive-terrain-diffusion's own tiler vs gigadiff.

Same seed, difficulty and sizes (1024² and 2048² by default). The package's large-map mode denoises overlapping
128² windows of one noise canvas once, Hann-blended, with no synchronization. gigadiff runs the same ONNX
network in its own loop: uniform or gaussian fusion, fixed or shifted grids, 1, 2 and 4 consistency steps.

Seam score (gigadiff.metrics.seam_score): mean squared height gradient across tile borders / the same everywhere
else, on each method's own borders (for shifted grids, every border of every step) and on the package's
borders. Also wall time, model calls and tiles per step. Writes a table, JSON, and a side-by-side shaded relief
of the same seam region.

    python bench/terrain_seams.py [--sizes 1024 2048] [--steps 1 2 4] [--difficulty 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

OVERLAP = 32  # the package's default tile overlap; gigadiff's terrain default is the same
CONFIGS = [("uniform", False), ("gaussian", False), ("gaussian", True)]


class CountingSession:
    """Wraps an ONNX Runtime session and counts `run` calls and the tiles they carry."""

    def __init__(self, session: Any):
        self.session, self.calls, self.tiles = session, 0, 0

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.calls += 1
        self.tiles += len(next(iter(feeds.values())))
        return self.session.run(outputs, feeds)


def package_borders(size: int) -> list[int]:
    from terrain_diffusion import TerrainGenerator

    starts = TerrainGenerator._tile_starts(size, 128, OVERLAP)
    return sorted({s for s in starts if s} | {s + 128 for s in starts if s + 128 < size})


def run_package(size: int, difficulty: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from terrain_diffusion import TerrainGenerator

    gen = TerrainGenerator(device="cpu")
    counter = CountingSession(gen.session)
    gen.session = counter
    start = time.perf_counter()
    heights = gen.generate(1, shape=(size, size), difficulty=difficulty, seed=seed, tile_overlap=OVERLAP)[0]
    wall = time.perf_counter() - start
    return heights, {"wall_s": wall, "model_calls": counter.calls, "tiles_per_step": counter.tiles, "steps": 1}


def run_gigadiff(backend: Any, size: int, difficulty: int, seed: int, weights: str, shift: bool, steps: int):
    from gigadiff.api import run_generation
    from gigadiff.metrics import grid_borders
    from gigadiff.recipes.txt2img import grid_plan
    from gigadiff.settings import GenerationSettings

    settings = GenerationSettings("", width=size, height=size, steps=steps, seed=seed, weights=weights, shift=shift,
                                  overlap=OVERLAP, extra={"difficulty": difficulty})  # fmt: skip
    start = time.perf_counter()
    result = run_generation(settings, backend)
    heights = backend.decode(result.latents)[0, 0].numpy()
    wall = time.perf_counter() - start
    plan = grid_plan(result.settings, backend.info)
    borders = grid_borders([plan.grid(i) for i in range(steps)])
    stats = {"wall_s": wall, "model_calls": result.run.model_calls, "tiles_per_step": result.run.tiles_per_step,
             "steps": steps}  # fmt: skip
    return heights, stats, borders


def seam_region(heights: np.ndarray, border: int, half: int = 128) -> np.ndarray:
    from gigadiff.io.relief import shaded_relief

    lo, hi = max(border - half, 0), border + half
    return shaded_relief(heights)[lo:hi, lo:hi]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--difficulty", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from gigadiff.api import open_backend
    from gigadiff.metrics import seam_score

    backend = open_backend("terrain", "cpu")
    rows: list[dict[str, Any]] = []
    header = (f"{'size':>5} {'method':<28} {'steps':>5} {'seam own':>9} {'seam pkg':>9} {'wall s':>8} "
              f"{'calls':>6} {'tiles/step':>10}")  # fmt: skip
    print(header)
    for size in args.sizes:
        lines = package_borders(size)
        heights, stats = run_package(size, args.difficulty, args.seed)
        score = seam_score(heights, lines, lines).ratio
        runs = [("package (own tiler)", heights, {**stats, "seam_own": score, "seam_pkg": score})]
        for weights, shift in CONFIGS:
            for steps in args.steps:
                h, st, (b_rows, b_cols) = run_gigadiff(backend, size, args.difficulty, args.seed, weights, shift, steps)
                st["seam_own"] = seam_score(h, b_rows, b_cols).ratio
                st["seam_pkg"] = seam_score(h, lines, lines).ratio
                runs.append((f"gigadiff {weights}{' shifted' if shift else ''}", h, st))
        for name, _, st in runs:
            rows.append({"size": size, "method": name, **st})
            print(f"{size:>5} {name:<28} {st['steps']:>5} {st['seam_own']:>9.3f} {st['seam_pkg']:>9.3f} "
                  f"{st['wall_s']:>8.1f} {st['model_calls']:>6} {st['tiles_per_step']:>10}")  # fmt: skip
        border = lines[len(lines) // 2]
        pair = [seam_region(runs[0][1], border), seam_region(runs[-1][1], border)]
        Image.fromarray(np.concatenate(pair, axis=1)).save(args.out / f"terrain_seams_{size}.png")
    report = {"benchmark": "terrain_seams", "difficulty": args.difficulty, "seed": args.seed, "overlap": OVERLAP,
              "rows": rows}  # fmt: skip
    (args.out / "terrain_seams.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'terrain_seams.json'} and terrain_seams_<size>.png (left: package, right: gigadiff)")


if __name__ == "__main__":
    main()
