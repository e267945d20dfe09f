"""Benchmark: tile-parallel denoising over 1 and 2 processes on the CPU (torchrun, gloo).

Per step and per rank: compute time (this rank's tiles), communication time (health barrier + all_gather of
predictions) and bytes received. One tiny SD model (seeded random weights), 1536x768, 512 px tiles, 4 steps.
Both world sizes run in this one invocation; each process gets one thread so that 2 processes use the 2
cores one process would otherwise share. Table plus JSON.

    python bench/parallel.py [--worlds 1 2] [--json bench/results/parallel.json]
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

SIZE, STEPS, TILE, TILE_BATCH = (1536, 768), 4, 512, 2


def worker(model: str, out: Path) -> None:
    """Runs under torchrun: one generation with the distributed executor; rank 0 writes every rank's profile."""
    import torch.distributed as dist

    from gigadiff.api import open_backend, run_generation
    from gigadiff.executors.distributed import DistributedExecutor
    from gigadiff.executors.launch import init_from_env, shutdown
    from gigadiff.settings import GenerationSettings

    ranks = init_from_env("cpu")
    backend = open_backend(model, "cpu")
    settings = GenerationSettings("a harbour at dusk", width=SIZE[0], height=SIZE[1], steps=STEPS, seed=1,
                                  tile=TILE, scheduler="ddim", tile_batch=TILE_BATCH, coherence="none")  # fmt: skip
    executor = DistributedExecutor(TILE_BATCH)
    start = time.perf_counter()
    result = run_generation(settings, backend, executor)
    wall = time.perf_counter() - start
    row = {"rank": ranks.rank, "wall_s": wall, "tiles_per_step": result.run.tiles_per_step,
           "per_step": executor.profile.per_step}  # fmt: skip
    rows = [None] * ranks.world
    dist.all_gather_object(rows, row)
    if ranks.is_main:
        out.write_text(json.dumps(rows))
    shutdown()


def launch(world: int, model: str, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
           "--worker", model, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "parallel.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return

    from gigadiff.testing import save_tiny, tiny_sd_pipeline

    report = {"benchmark": "parallel", "size": SIZE, "steps": STEPS, "tile": TILE, "tile_batch": TILE_BATCH,
              "runs": {}}  # fmt: skip
    print(f"{'world':>5} {'rank':>4} {'tiles/step':>10} {'compute s/step':>15} {'comm s/step':>12} "
          f"{'MB/step':>8} {'wall s':>7}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny(tiny_sd_pipeline(seed=0), Path(tmp) / "tiny-sd"))
        for world in args.worlds:
            rows = launch(world, model, Path(tmp) / f"w{world}.json")
            report["runs"][str(world)] = rows
            for r in rows:
                steps = r["per_step"]
                compute = statistics.mean(s["compute_s"] for s in steps)
                comm = statistics.mean(s["comm_s"] for s in steps)
                mb = statistics.mean(s["bytes"] for s in steps) / 1e6
                print(f"{world:>5} {r['rank']:>4} {r['tiles_per_step']:>10} {compute:>15.3f} {comm:>12.4f} "
                      f"{mb:>8.2f} {r['wall_s']:>7.2f}")  # fmt: skip
    walls = {w: max(r["wall_s"] for r in rows) for w, rows in report["runs"].items()}
    if "1" in walls and "2" in walls:
        report["speedup_2"] = walls["1"] / walls["2"]
        print(f"speed-up with 2 processes: {report['speedup_2']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
