"""Benchmark: `gigadiff serve` under load — concurrent clients, a busy worker, every job accounted for.

A real server (one CPU worker, a tiny SD model saved to disk) first gets one long job; then 20 client threads
each submit 2 tiny jobs (40 in all, distinct seeds) and poll `GET /api/jobs/{id}` until theirs are done, timing
every poll. Checked: no job lost (41 in the queue, all done), none run twice (each claimed once), and every tiny
job's image equal to the same request run by the command line. Printed: p50/p99/max latency of the polls made
while the worker was busy (target p99 < 100 ms), and the wall time. Table plus JSON.

    python bench/serve.py [--clients 20] [--jobs-per-client 2] [--json bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models: tests/helpers/tiny.py

JOB = {"prompt": "a quiet bay", "model": "tiny-sd", "size": "256x256", "steps": 2, "tile": 256,
       "scheduler": "ddim"}  # fmt: skip
LONG = {**JOB, "size": "1024x768", "steps": 12, "seed": 999}


def client_thread(url: str, seeds: list[int], polls: list[tuple[float, float, bool]], ids: dict[int, str],
                  lock: threading.Lock) -> None:  # fmt: skip
    from gigadiff.serve.client import Client

    client = Client(url)
    mine = [client.submit({**JOB, "seed": s}) for s in seeds]
    with lock:
        ids.update(zip(seeds, mine, strict=True))
    pending = set(mine)
    while pending:
        for job_id in list(pending):
            start = time.perf_counter()
            job = client.job(job_id)
            elapsed = time.perf_counter() - start
            with lock:
                polls.append((start, elapsed, job["status"] == "running"))
            if job["status"] in ("done", "failed", "cancelled"):
                pending.discard(job_id)
        time.sleep(0.05)


def cli_image(model: Path, request: dict, out: Path) -> np.ndarray:
    import tifffile
    from typer.testing import CliRunner

    from gigadiff.cli import app
    from gigadiff.options import generate_args

    args = [*generate_args({**request, "model": str(model)}), "-o", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tifffile.imread(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs-per-client", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve.json"))
    args = parser.parse_args()
    import tifffile

    from gigadiff.serve.client import Client
    from gigadiff.serve.store import JobStore
    from tests.helpers.served import served
    from tests.helpers.tiny import save_tiny, tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        model = save_tiny(tiny_sd_pipeline(seed=0), models / "tiny-sd")
        data = Path(tmp) / "data"
        with served(data, "--models", str(models)) as (url, _):
            client = Client(url)
            started = time.perf_counter()
            long_id = client.submit(LONG)
            client.wait(long_id, until=("running",), timeout=300)
            polls: list[tuple[float, float, bool]] = []
            ids: dict[int, str] = {}
            lock = threading.Lock()
            seeds = list(range(args.clients * args.jobs_per_client))
            threads = [threading.Thread(target=client_thread, args=(url, seeds[i :: args.clients], polls, ids, lock))
                       for i in range(args.clients)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            client.wait(long_id, timeout=600)
            wall = time.perf_counter() - started
            jobs = {j["id"]: j for j in client.jobs()}
            images = {seed: tifffile.imread(client.download(job_id, Path(tmp) / f"served-{seed}.tif"))
                      for seed, job_id in ids.items()}  # fmt: skip
        store = JobStore(data / "jobs.db")
        claimed = {job_id: store.get(job_id).attempts for job_id in jobs}
        equal = 0
        for seed, image in images.items():
            equal += int(np.array_equal(image, cli_image(model, {**JOB, "seed": seed}, Path(tmp) / f"cli-{seed}.tif")))
    busy = np.array([elapsed for _, elapsed, running in polls if running] or [elapsed for _, elapsed, _ in polls])
    done = sum(j["status"] == "done" for j in jobs.values())
    row = {"clients": args.clients, "jobs": len(seeds) + 1, "in_queue": len(jobs), "done": done,
           "claimed_once": sum(a == 1 for a in claimed.values()), "equal_to_cli": equal, "polls": len(polls),
           "busy_polls": int(busy.size), "p50_ms": float(np.percentile(busy, 50) * 1000),
           "p99_ms": float(np.percentile(busy, 99) * 1000), "max_ms": float(busy.max() * 1000),
           "wall_s": wall}  # fmt: skip
    print(f"{'clients':>7} {'jobs':>5} {'in queue':>8} {'done':>5} {'claimed once':>12} {'= CLI':>6} {'polls':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'wall s':>7}")  # fmt: skip
    print(f"{row['clients']:>7} {row['jobs']:>5} {row['in_queue']:>8} {row['done']:>5} {row['claimed_once']:>12} "
          f"{row['equal_to_cli']:>6} {row['busy_polls']:>6} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} "
          f"{row['max_ms']:>7.1f} {row['wall_s']:>7.1f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=2))
    assert row["in_queue"] == row["jobs"] == row["done"] == row["claimed_once"], "a job was lost, failed or run twice"
    assert row["equal_to_cli"] == len(seeds), "a served image differs from the command line's"


if __name__ == "__main__":
    main()
