"""Benchmark: seams on a real pretrained model — adaptive-terrain-diffusion's own tiler vs gigadiff.

Same seed, difficulty and sizes (1024² and 2048² by default). The package's large-map mode denoises overlapping
128² windows of one noise canvas once, Hann-blended, with no synchronization. gigadiff runs the same ONNX
network in its own loop: uniform, gaussian or linear fusion, fixed or shifted grids, with or without level
consensus (gigadiff.levels), 1, 2 and 4 consistency steps, at the package's default overlap (32 px) or at
gigadiff's terrain default (64 px: half a tile). The package runs at both overlaps, so every gigadiff row has
a package row with the same tiles per step beside it.

Grid anisotropy (gigadiff.metrics.grid_anisotropy): spectral power along the two image axes against the oblique
directions, in model space, with its chance spread: tile-sized plateaus and seams are straight, axis-aligned
edges (a grid); natural relief has no preferred direction and scores about 1.

Seam score (gigadiff.metrics.seam_score): mean squared gradient across each method's own tile borders (for
shifted grids, every border of every step) / the same everywhere else, with its spread over random line sets
("null sd": how far from 1 chance alone moves it) and the local ratio (each border line against the lines
6-12 px beside it). Scored in the model's own space (asinh-companded heights in [-1, 1], where the texture is
about equally rough everywhere) and in metres (where a few high ranges carry most of the gradient energy, so
the null spread is several times larger). Also wall time, model calls, tiles per step and tiles evaluated in
all (level consensus adds 4 probe tiles per step). Writes a table, JSON, and a side-by-side shaded relief of
the same seam region.

    python bench/terrain_seams.py [--sizes 1024 2048] [--steps 1 2 4] [--difficulty 60] [--seed 0]
                                  [--package-overlaps 32 64] [--configs uniform ... default]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CONFIGS = {  # name: (weights, shifted grids, level consensus, overlap px)
    "uniform": ("uniform", False, False, 32),
    "gaussian": ("gaussian", False, False, 32),
    "gaussian-shifted": ("gaussian", True, False, 32),
    "linear-shifted": ("linear", True, False, 32),
    "level-sync-32": ("linear", True, True, 32),
    "linear-shifted-64": ("linear", True, False, 64),
    "default": ("linear", True, True, 64),
}


class CountingSession:
    """Wraps an ONNX Runtime session and counts `run` calls and the tiles they carry."""

    def __init__(self, session: Any):
        self.session, self.calls, self.tiles = session, 0, 0

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.calls += 1
        self.tiles += len(next(iter(feeds.values())))
        return self.session.run(outputs, feeds)


def package_starts(size: int, overlap: int) -> list[int]:
    from terrain_diffusion import TerrainGenerator

    return [s for s in TerrainGenerator._tile_starts(size, 128, overlap) if s]


def package_borders(size: int, overlap: int) -> list[int]:
    starts = package_starts(size, overlap)
    return sorted(set(starts) | {s + 128 for s in starts if s + 128 < size})


def handover_peak(image: np.ndarray, starts: list[int], overlap: int) -> float:
    """Highest mean gradient energy, over the offsets d in [0, overlap), of the lines d px after a tile start.

    A cross-fade puts its seam inside the overlap (a Gaussian hands over in its middle), where the border
    score does not look; this finds it on the last step's grid. Relative to the image's mean line energy.
    """
    from gigadiff.metrics import line_energies

    energies = line_energies(image)
    mean = float(np.mean([e.mean() for e in energies]))
    profile = [np.mean([e[s + d - 1] for e in energies for s in starts if s + d - 1 < e.size]) for d in range(overlap)]
    return float(max(profile)) / mean


def run_package(size: int, difficulty: int, seed: int, overlap: int):
    from terrain_diffusion import TerrainGenerator

    gen = TerrainGenerator(device="cpu")
    counter = CountingSession(gen.session)
    gen.session = counter
    start = time.perf_counter()
    heights = gen.generate(1, shape=(size, size), difficulty=difficulty, seed=seed, tile_overlap=overlap)[0]
    wall = time.perf_counter() - start
    stats = {"wall_s": wall, "model_calls": counter.calls, "tiles_per_step": counter.tiles, "steps": 1,
             "tiles_evaluated": counter.tiles, "overlap": overlap}  # fmt: skip
    lines = package_borders(size, overlap)
    return heights, stats, (lines, lines), (package_starts(size, overlap), overlap)


def run_gigadiff(backend: Any, size: int, difficulty: int, seed: int, config: tuple[str, bool, bool, int], steps: int):
    from gigadiff.api import generate_result
    from gigadiff.grids import grid_plan
    from gigadiff.metrics import grid_borders

    weights, shift, level_sync, overlap = config
    start = time.perf_counter()
    result = generate_result(model=backend, size=f"{size}x{size}", steps=steps, seed=seed, weights=weights,
                             shift=shift, level_sync=level_sync, overlap=overlap, difficulty=difficulty)  # fmt: skip
    heights = result.decode()[0, 0].numpy()
    wall = time.perf_counter() - start
    plan = grid_plan(result.settings, backend.info)
    borders = grid_borders([plan.grid(i) for i in range(steps)])
    last = plan.grid(steps - 1)
    starts = sorted({t.x for t in last if t.x > 0})  # square canvas: rows start where columns do
    last_overlap = min(a.x + a.w - b.x for a, b in zip(last.tiles, last.tiles[1:], strict=False) if b.x > a.x)
    stats = {"wall_s": wall, "model_calls": result.run.model_calls, "tiles_per_step": result.run.tiles_per_step,
             "steps": steps, "tiles_evaluated": result.run.evaluated_pixels // 128**2, "overlap": overlap}  # fmt: skip
    return heights, stats, borders, (starts, last_overlap)


def seam_columns(heights: np.ndarray, borders: tuple[list[int], list[int]], last: tuple[list[int], int]):
    """Seam ratio, its null spread, the local ratio and the hand-over peak, in model space and in metres; and
    the grid anisotropy (model space)."""
    import torch

    from gigadiff.backends.terrain import heights_to_model
    from gigadiff.metrics import grid_anisotropy, seam_score

    model = heights_to_model(torch.from_numpy(np.asarray(heights, dtype=np.float32))).numpy()
    grid = grid_anisotropy(model)
    out = {"grid_model": grid.ratio, "grid_log_sd": grid.null_sd}
    for space, image in (("model", model), ("m", heights)):
        score = seam_score(image, *borders)
        out |= {f"seam_{space}": score.ratio, f"null_sd_{space}": score.null_sd, f"local_{space}": score.local,
                f"handover_{space}": handover_peak(image, *last)}  # fmt: skip
    return out


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
    parser.add_argument("--package-overlaps", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from gigadiff.api import open_backend

    backend = open_backend("terrain", "cpu")
    rows: list[dict[str, Any]] = []
    header = (f"{'size':>5} {'method':<26} {'overlap':>7} {'steps':>5} {'grid':>12} "
              f"{'seam model':>15} {'local':>6} {'hand-over':>9} "
              f"{'seam metres':>15} {'local':>6} {'hand-over':>9} "
              f"{'wall s':>7} {'calls':>6} {'tiles/step':>10} {'tiles run':>9}")  # fmt: skip
    print(header)
    for size in args.sizes:
        runs = []
        for overlap in args.package_overlaps:
            heights, stats, lines, last = run_package(size, args.difficulty, args.seed, overlap)
            runs.append(("package (own tiler)", heights, {**stats, **seam_columns(heights, lines, last)}))
        for name in args.configs:
            for steps in args.steps:
                h, st, borders, last = run_gigadiff(backend, size, args.difficulty, args.seed, CONFIGS[name], steps)
                runs.append((f"gigadiff {name}", h, {**st, **seam_columns(h, borders, last)}))
        for name, _, st in runs:
            rows.append({"size": size, "method": name, **st})
            spread = math.exp(st["grid_log_sd"])
            print(f"{size:>5} {name:<26} {st['overlap']:>7} {st['steps']:>5} {st['grid_model']:>5.2f} ×÷{spread:<5.2f} "
                  f"{st['seam_model']:>7.3f} ±{st['null_sd_model']:<6.3f} "
                  f"{st['local_model']:>6.3f} {st['handover_model']:>9.2f} "
                  f"{st['seam_m']:>7.3f} ±{st['null_sd_m']:<6.3f} "
                  f"{st['local_m']:>6.3f} {st['handover_m']:>9.2f} "
                  f"{st['wall_s']:>7.1f} {st['model_calls']:>6} {st['tiles_per_step']:>10} {st['tiles_evaluated']:>9}",
                  flush=True)  # fmt: skip
        report = {"benchmark": "terrain_seams", "difficulty": args.difficulty, "seed": args.seed, "rows": rows}
        (args.out / "terrain_seams.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = package_borders(size, args.package_overlaps[0])
        border = lines[len(lines) // 2]
        pair = [seam_region(runs[0][1], border), seam_region(runs[-1][1], border)]
        Image.fromarray(np.concatenate(pair, axis=1)).save(args.out / f"terrain_seams_{size}.png")
    print(f"wrote {args.out / 'terrain_seams.json'} and terrain_seams_<size>.png")
    print("(left: the package at the first of --package-overlaps, right: the last gigadiff row)")


if __name__ == "__main__":
    main()
