"""Benchmark: do tile overlaps read like the interior on the real terrain model, at its one-step default?

Measured in the model's own height space on the package's grid (512², tile 128, overlap 32, no shifted
grids, seed 3, difficulty 60), gigadiff against the package's own tiler:

- band texture (gigadiff.metrics.band_texture): gradient and high-pass energy in the pixels under two or more
  tiles against the pixels under one (target 0.9-1.1; gigadiff's default half-tile overlap covers every pixel
  twice, so this grid is where it can be measured);
- line contrast (gigadiff.metrics.line_contrast), in metres: the strongest row or column boundary against its
  neighbours (target at most 1.25), also on the README's main job (1024², seeds 7 and 3), with gigadiff's
  default grids and with the grid left unshifted.

    python bench/terrain_bands.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

DIFFICULTY = 60
PACKAGE_GRID = {"size": 512, "seed": 3, "overlap": 32, "shift": False}
MAIN_JOB = {"size": 1024, "seeds": (7, 3)}


def package_run(size: int, seed: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """The package's own tiler's heights and how many of its tiles cover each pixel."""
    from terrain_diffusion import TerrainGenerator

    heights = TerrainGenerator(device="cpu").generate(1, shape=(size, size), difficulty=DIFFICULTY, seed=seed,
                                                      tile_overlap=overlap)[0]  # fmt: skip
    starts = TerrainGenerator._tile_starts(size, 128, overlap)
    count = np.zeros(size, dtype=np.int64)
    for s in starts:
        count[s : s + 128] += 1
    return np.asarray(heights, dtype=np.float32), np.multiply.outer(count, count) >= 2


def gigadiff_run(backend: Any, size: int, seed: int, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """gigadiff's heights and which pixels two or more tiles cover."""
    from gigadiff.api import generate_result
    from gigadiff.grids import border_pad, grid_plan
    from gigadiff.metrics import coverage

    result = generate_result(model=backend, size=f"{size}x{size}", seed=seed, difficulty=DIFFICULTY, **options)
    plan = grid_plan(result.settings, backend.info)
    py, px = border_pad(result.settings, backend.info)
    covered = coverage(plan.grid(0))[py : py + size, px : px + size]
    return result.decode()[0, 0].numpy(), covered >= 2


def model_space(heights: np.ndarray) -> np.ndarray:
    import torch

    from gigadiff.backends.terrain import heights_to_model

    return heights_to_model(torch.from_numpy(np.ascontiguousarray(heights))).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from gigadiff.api import open_backend
    from gigadiff.metrics import BandTexture, band_texture, line_contrast

    backend = open_backend("terrain", "cpu")
    rows: list[dict[str, Any]] = []
    print(f"{'grid':<28} {'method':<26} {'gradient':>8} {'high-pass':>9} {'line':>6} {'at':>10} {'wall s':>7}")

    def record(grid: str, method: str, heights: np.ndarray, overlapped: np.ndarray, wall: float) -> None:
        nan = float("nan")  # half-tile overlaps cover every pixel twice: no pixels under one tile to compare with
        bands = band_texture(model_space(heights), overlapped) if not overlapped.all() else BandTexture(nan, nan)
        line = line_contrast(heights)
        rows.append({"grid": grid, "method": method, "gradient": bands.gradient, "highpass": bands.highpass,
                     "line": line.ratio, "line_at": f"{line.axis} {line.at}", "wall_s": wall})  # fmt: skip
        print(f"{grid:<28} {method:<26} {bands.gradient:>8.3f} {bands.highpass:>9.3f} {line.ratio:>6.3f} "
              f"{line.axis + ' ' + str(line.at):>10} {wall:>7.1f}", flush=True)  # fmt: skip

    g = PACKAGE_GRID
    start = time.perf_counter()
    heights, overlapped = package_run(g["size"], g["seed"], g["overlap"])
    record("package 512² ov32 seed 3", "package (own tiler)", heights, overlapped, time.perf_counter() - start)
    grids = [("package 512² ov32 seed 3", "gigadiff", PACKAGE_GRID)]
    for seed in MAIN_JOB["seeds"]:
        grid = f"main job 1024² seed {seed}"
        grids += [
            (grid, "gigadiff", {"size": MAIN_JOB["size"], "seed": seed}),
            (grid, "gigadiff unshifted grid", {"size": MAIN_JOB["size"], "seed": seed, "shift": False}),
        ]
    for grid, method, options in grids:
        start = time.perf_counter()
        heights, overlapped = gigadiff_run(backend, **options)
        record(grid, method, heights, overlapped, time.perf_counter() - start)
    report = {"benchmark": "terrain_bands", "difficulty": DIFFICULTY, "rows": rows}
    (args.out / "terrain_bands.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'terrain_bands.json'}")


if __name__ == "__main__":
    main()
