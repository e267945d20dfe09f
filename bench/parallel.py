"""Benchmark: tile-parallel denoising over 1, 2 and 3 processes on the CPU (torchrun, gloo).

Per rank and step: the tiles it ran, its busy time (computing its tiles), its communication time (health
barrier + all_gather of predictions, waiting for slower ranks included) and the bytes it received. One tiny SD
model (seeded random weights), 512 px tiles, 4 DDIM steps, the default tile batch; a canvas of 8 tiles
(1536x768) and one of only 3 (1024x512 with 64 px overlaps), where a rank with no tiles would show as idle.
Every world size runs in this one invocation; the two cores are shared out as threads (2 processes: 1 thread
each). Table plus JSON.

    python bench/parallel.py [--worlds 1 2 3] [--canvases 1536x768 1024x512] [--json bench/results/parallel.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models: tests/helpers/tiny.py

STEPS, TILE = 4, 512


def worker(model: str, size: str, out: Path) -> None:
    """Runs under torchrun: one generation with the distributed executor; rank 0 writes every rank's profile."""
    import torch.distributed as dist

    from gigadiff.api import open_backend
    from gigadiff.backends.registry import described_backend
    from gigadiff.executors.launch import init_from_env, shutdown
    from gigadiff.options import RunRequest
    from gigadiff.runs.execute import execute
    from gigadiff.runs.resolve import resolve

    ranks = init_from_env("cpu")
    backend = open_backend(model, "cpu")
    request = RunRequest(prompt="a harbour at dusk", size=size, steps=STEPS, seed=1, tile=TILE, scheduler="ddim",
                         coherence="none", device="cpu")  # fmt: skip
    run = resolve(request, described=described_backend(backend), writes=False)
    start = time.perf_counter()
    done = execute(run, backend, ranks=ranks, write=False)
    wall = time.perf_counter() - start
    result, profile = done.result, getattr(done.executor, "profile")  # noqa: B009 - the distributed executor's
    row = {"rank": ranks.rank, "wall_s": wall, "tiles_per_step": result.run.tiles_per_step,
           "tile_batch": result.settings.tile_batch, "model_calls": result.run.model_calls,
           "own_tiles": profile.tiles, "per_step": profile.per_step}  # fmt: skip
    rows = [None] * ranks.world
    dist.all_gather_object(rows, row)
    if ranks.is_main:
        out.write_text(json.dumps(rows))
    shutdown()


def launch(world: int, model: str, size: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
           "--worker", model, "--size", size, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--canvases", nargs="+", default=["1536x768", "1024x512"])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "parallel.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.out)
        return

    from tests.helpers.tiny import save_tiny, tiny_sd_pipeline

    report: dict = {"benchmark": "parallel", "steps": STEPS, "tile": TILE, "runs": {}}
    print(f"{'canvas':>9} {'world':>5} {'rank':>4} {'tiles':>5} {'own tiles/step':>14} {'busy s/step':>11} "
          f"{'comm s/step':>11} {'MB/step':>8} {'wall s':>7} {'calls':>5}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny(tiny_sd_pipeline(seed=0), Path(tmp) / "tiny-sd"))
        for size in args.canvases:
            for world in args.worlds:
                rows = launch(world, model, size, Path(tmp) / f"{size}-{world}.json")
                report["runs"][f"{size}/{world}"] = rows
                for r in rows:
                    steps = r["per_step"]
                    busy = statistics.mean(s["compute_s"] for s in steps)
                    comm = statistics.mean(s["comm_s"] for s in steps)
                    mb = statistics.mean(s["bytes"] for s in steps) / 1e6
                    own = r["own_tiles"] / len(steps)
                    print(f"{size:>9} {world:>5} {r['rank']:>4} {r['tiles_per_step']:>5} {own:>14.1f} {busy:>11.3f} "
                          f"{comm:>11.4f} {mb:>8.2f} {r['wall_s']:>7.2f} {r['model_calls']:>5}")  # fmt: skip
    for size in args.canvases:
        walls = {w: max(r["wall_s"] for r in report["runs"][f"{size}/{w}"]) for w in args.worlds}
        for w in args.worlds:
            if w != 1 and 1 in walls:
                report.setdefault("speedups", {})[f"{size}/{w}"] = walls[1] / walls[w]
                print(f"{size}: {w} processes {walls[1] / walls[w]:.2f}x the speed of one")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
