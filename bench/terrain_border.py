"""Benchmark: is the terrain map's border as trustworthy as its interior, and how high do its heights reach?

For several seeds at 1024² and 2048x1024 (difficulty 60, the model's defaults), gigadiff and the package's own
tiler (`TerrainGenerator.generate`, same difficulty, seed and sizes, its default 32 px overlap): where the
highest 0.5% of pixels lie, and how widely heights spread in the border band against the rings inside. If the
border band (the outer 16 px) behaved like the interior, it would hold the same share of them as of the area:
"border" is that ratio, and "inner" the same ratio for the rings of the same width further in (16-32 px from
the border, 32-48, ... down to 160), its chance spread; "spread" is the band's standard deviation of heights over
the inner rings' mean. Also: pixels at the model's clamps (0 m and its ceiling of 22.17 m; the package subtracts
each map's minimum, so one pixel sits at 0 m by construction), the height range, and the relief (mean height
range of the 128-px windows, the model's native size). Writes the reliefs (bench/results/terrain_border_*.png)
to look at, a table and JSON.

    python bench/terrain_border.py [--seeds 0 1 2 3 4] [--sizes 1024x1024 2048x1024]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

BAND, TOP, RINGS = 16, 0.005, 10


def ring_mask(height: int, width: int, inner: int, outer: int) -> np.ndarray:
    """Pixels whose distance to the nearest image edge lies in [inner, outer)."""
    ys = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None]
    xs = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :]
    distance = np.minimum(ys, xs)
    return (distance >= inner) & (distance < outer)


def relief(heights: np.ndarray, window: int = 128) -> float:
    h, w = heights.shape
    corners = [(y, x) for y in range(0, h - window + 1, window) for x in range(0, w - window + 1, window)]
    return float(np.mean([np.ptp(heights[y : y + window, x : x + window]) for y, x in corners]))


def measure(heights: np.ndarray) -> dict[str, float]:
    from gigadiff.backends.terrain import HEIGHT_RANGE_M

    return {**placement(heights), "at_floor": int((heights <= 0).sum()),
            "at_ceiling": int((heights >= HEIGHT_RANGE_M - 1e-4).sum()), "min_m": float(heights.min()),
            "max_m": float(heights.max()), "relief_m": relief(heights)}  # fmt: skip


def placement(heights: np.ndarray) -> dict[str, float]:
    """Share of the top pixels in each ring / the ring's share of the area: the border ring, then inner rings."""
    top = heights >= np.quantile(heights, 1 - TOP)
    ratios = []
    for k in range(RINGS):
        ring = ring_mask(*heights.shape, k * BAND, (k + 1) * BAND)
        ratios.append(float(top[ring].sum() / top.sum()) / float(ring.mean()))
    inner = np.array(ratios[1:])
    band = ring_mask(*heights.shape, 0, BAND)
    spread = [float(heights[ring_mask(*heights.shape, k * BAND, (k + 1) * BAND)].std()) for k in range(RINGS)]
    return {"border_ratio": ratios[0], "inner_mean": float(inner.mean()), "inner_sd": float(inner.std(ddof=1)),
            "inner_ratios": ratios[1:], "band_share": float(band.mean()),
            "spread_ratio": spread[0] / float(np.mean(spread[1:]))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "2048x1024"])
    parser.add_argument("--difficulty", type=int, default=60)
    parser.add_argument("--json", type=Path, default=Path("bench/results/terrain_border.json"))
    args = parser.parse_args()
    from PIL import Image
    from terrain_diffusion import TerrainGenerator

    import gigadiff
    from gigadiff.io.relief import shaded_relief

    backend = gigadiff.open_backend("terrain", device="cpu")
    package = TerrainGenerator(device="cpu")
    rows = []
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'size':>10} {'seed':>4} {'method':>8} {'border':>7} {'inner +- sd':>13} {'spread':>6} {'at 0 m':>7} "
          f"{'at 22 m':>7} {'range m':>11} {'relief m':>8} {'s':>5}")  # fmt: skip
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        for seed in args.seeds:
            for method in ("gigadiff", "package"):
                start = time.perf_counter()
                if method == "gigadiff":
                    heights = gigadiff.generate(model=backend, size=size, seed=seed, difficulty=args.difficulty,
                                                output_type="heights")  # fmt: skip
                else:
                    heights = package.generate(shape=(height, width), difficulty=args.difficulty, seed=seed)[0]
                wall = time.perf_counter() - start
                row = {"size": size, "seed": seed, "method": method, "wall_s": wall, **measure(heights)}
                rows.append(row)
                if method == "gigadiff":
                    Image.fromarray(shaded_relief(heights)).save(args.json.parent / f"terrain_border_{size}_{seed}.png")
                print(f"{size:>10} {seed:>4} {method:>8} {row['border_ratio']:>7.2f} {row['inner_mean']:>6.2f} +- "
                      f"{row['inner_sd']:<5.2f} {row['spread_ratio']:>6.2f} {row['at_floor']:>7} "
                      f"{row['at_ceiling']:>7} {row['min_m']:>5.2f}-{row['max_m']:<5.2f} {row['relief_m']:>8.2f} "
                      f"{wall:>5.0f}", flush=True)  # fmt: skip
                args.json.write_text(json.dumps(rows, indent=2))
    for method in ("gigadiff", "package"):
        mine = [r for r in rows if r["method"] == method]
        border = np.array([r["border_ratio"] for r in mine])
        inner = np.array([v for r in mine for v in r["inner_ratios"]])
        print(f"{method}: border ratio {border.mean():.2f} over {len(mine)} maps (inner rings {inner.mean():.2f} +- "
              f"{inner.std(ddof=1):.2f}), spread {np.mean([r['spread_ratio'] for r in mine]):.2f}, "
              f"{sum(r['at_floor'] + r['at_ceiling'] for r in mine)} pixels at a clamp, relief "
              f"{np.mean([r['relief_m'] for r in mine]):.2f} m")  # fmt: skip


if __name__ == "__main__":
    main()
