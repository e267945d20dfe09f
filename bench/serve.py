"""Benchmark: `gigadiff serve` under load — concurrent clients, a busy worker, every job accounted for.

A real server (one CPU worker, a tiny SD model saved to disk) first gets one long job; then 20 client threads
each submit 2 tiny jobs (40 in all, distinct seeds) and poll `GET /api/jobs/{id}` until theirs are done, timing
every poll. Meanwhile (unless `--calm`) the worker is SIGKILLed once under the long job (the supervisor replaces
it and the job resumes from its checkpoint) and one hostile client sends malformed and malicious requests in a
loop (NaN, lone surrogates, deep nesting, 5000-digit numbers, a PNG header declaring 65536² pixels as a mask and
as an init image, a 65536² canvas, 20000 regions, a cross-origin POST, a text/plain POST, a foreign Host, an
oversized chunked body), each of which must be answered 4xx with {"error"}. Checked: no honest job lost (41 in
the queue, all done), none run twice (each tiny job claimed once; the long job twice, once per worker), every tiny
job's image equal to the same request run by the command line, and no hostile request answered other than 4xx.
Printed: p50/p99/max latency of the polls made while the worker was busy (target p99 < 100 ms), the hostile
requests sent and how they were answered, and the wall time. Table plus JSON.

With `--ray`, the server runs its jobs on a Ray cluster of two one-CPU nodes simulated on this machine (on the
loopback address): instead of a worker, the node running the long job is removed mid-job and a fresh node joins,
as an operator would replace a lost machine; the same checks hold.

    python bench/serve.py [--clients 20] [--jobs-per-client 2] [--calm] [--ray] [--json bench/results/serve.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models: tests/helpers/tiny.py

JOB = {"prompt": "a quiet bay", "model": "tiny-sd", "size": "256x256", "steps": 2, "tile": 256,
       "scheduler": "ddim"}  # fmt: skip
LONG = {**JOB, "size": "1024x768", "steps": 12, "seed": 999}
HOSTILE_ADDRESS = "127.0.0.2"
"""The hostile client's own address (all of 127.0.0.0/8 is this machine): an attacker is not the honest clients."""


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


def hostile_requests() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) of every bad request the service was shown to mishandle."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 65536, 65536, 8, 0, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")
    url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    job = {"prompt": "x", "model": "tiny-sd"}
    as_json = {"Content-Type": "application/json"}

    def post(body: object | bytes, **headers: str) -> tuple[str, str, bytes, dict[str, str]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return "POST", "/api/jobs", raw, {**as_json, **headers}

    return [
        post(b'{"prompt": "x", "steps": NaN}'),
        post(b'{"prompt": "x\\ud800"}'),
        post(b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
        post(b'{"seed": ' + b"9" * 5000 + b"}"),
        post({**job, "size": "512x512", "regions": [{"mask": url, "prompt": "x"}]}),
        post({**job, "init": url}),
        post({**job, "size": "65536x65536"}),
        post({**job, "regions": [{"box": [0, 0, 1, 1], "prompt": "x"}] * 20000}),
        post(job, Origin="http://evil.example"),
        post(job, **{"Content-Type": "text/plain"}),
        ("GET", "/api/jobs", b"", {"Host": "attacker.example"}),
        ("GET", "/api/jobs?limit=x", b"", {}),
        ("PUT", "/api/jobs", b"", {}),
        ("POST", "/login", b"token=" + b"x" * 100000, {"Content-Type": "application/x-www-form-urlencoded"}),
    ]


def hostile_client(url: str, stop: Any, answers: Any) -> None:
    """Send the bad requests in a loop until `stop`, counting the status codes of the answers (a process of its
    own: in the honest clients' process its JSON work would hold their interpreter lock and inflate their
    measured latency), from an address of its own (the server throttles an address whose requests keep
    failing)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    requests = hostile_requests()
    while not stop.is_set():
        for method, path, body, headers in requests:
            connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30,
                                                    source_address=(HOSTILE_ADDRESS, 0))  # fmt: skip
            try:
                connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                if "Host" not in headers:
                    connection.putheader("Host", where.netloc)
                for key, value in headers.items():
                    connection.putheader(key, value)
                connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body)
                response = connection.getresponse()
                data = response.read()
                ok = 400 <= response.status < 500 and set(json.loads(data)) == {"error"}
                status = response.status if ok else -response.status
            except Exception:
                status = 0  # no answer at all
            finally:
                connection.close()
            answers[status] = answers.get(status, 0) + 1


def cli_image(model: Path, request: dict, out: Path) -> np.ndarray:
    import tifffile
    from typer.testing import CliRunner

    from gigadiff.cli import app
    from gigadiff.options import generate_args

    args = [*generate_args({**request, "model": str(model)}), "-o", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tifffile.imread(out)


def killable(job: Any, cluster: Any) -> bool:
    """The long job is past two steps (it checkpoints every step) and placed: on a worker, or a Ray node."""
    placed = job.worker is not None if cluster is None else (job.runs_on or "").startswith("ray node")
    return job.step >= 2 and placed


@contextlib.contextmanager
def simulated_cluster(wanted: bool) -> Iterator[Any]:
    """A Ray cluster of two one-CPU nodes on 127.0.0.1 (and a head with no CPU), or None."""
    if not wanted:
        yield None
        return
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on the loopback address, never the machine's interface
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--jobs-per-client", type=int, default=2)
    parser.add_argument("--calm", action="store_true", help="no worker killed and no hostile client")
    parser.add_argument("--ray", action="store_true", help="jobs on a simulated two-node Ray cluster")
    parser.add_argument("--json", type=Path, default=None, help="default: bench/results/serve[-ray].json")
    args = parser.parse_args()
    args.json = args.json or Path(f"bench/results/serve{'-ray' if args.ray else ''}.json")
    import tifffile

    from gigadiff.serve.client import Client
    from gigadiff.serve.store import JobStore
    from tests.helpers.served import served
    from tests.helpers.tiny import save_tiny, tiny_sd_pipeline

    with tempfile.TemporaryDirectory() as tmp, simulated_cluster(args.ray) as cluster:
        models = Path(tmp) / "models"
        model = save_tiny(tiny_sd_pipeline(seed=0), models / "tiny-sd")
        data = Path(tmp) / "data"
        where = ("--ray", cluster.address) if cluster is not None else ()
        with served(data, "--models", str(models), *where) as (url, _):
            client = Client(url)
            started = time.perf_counter()
            long_id = client.submit(LONG)
            client.wait(long_id, until=("running",), timeout=300)
            store = JobStore(data / "jobs.db")
            context = multiprocessing.get_context("spawn")
            manager = context.Manager()
            stop, shared = manager.Event(), manager.dict()
            hostile = context.Process(target=hostile_client, args=(url, stop, shared))
            if not args.calm:
                hostile.start()
                while not killable(store.get(long_id), cluster):
                    time.sleep(0.05)
                if cluster is None:
                    os.kill(store.get(long_id).worker, signal.SIGKILL)
                else:
                    node = next(n for n in cluster.list_all_nodes() if n.node_id[:12] in store.get(long_id).runs_on)
                    cluster.remove_node(node)
                    cluster.add_node(num_cpus=1)
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
            stop.set()
            if hostile.is_alive():
                hostile.join()
            answers = dict(shared)
            manager.shutdown()
            jobs = {j["id"]: j for j in client.jobs()}
            images = {seed: tifffile.imread(client.download(job_id, Path(tmp) / f"served-{seed}.tif"))
                      for seed, job_id in ids.items()}  # fmt: skip
        claimed = {job_id: store.get(job_id).attempts for job_id in jobs}
        long_runs = claimed.pop(long_id)
        equal = 0
        if cluster is not None:  # a Ray task gets one thread per CPU it asked for: the CLI's sums must be alike
            import torch

            torch.set_num_threads(1)
        for seed, image in images.items():
            equal += int(np.array_equal(image, cli_image(model, {**JOB, "seed": seed}, Path(tmp) / f"cli-{seed}.tif")))
    busy = np.array([elapsed for _, elapsed, running in polls if running] or [elapsed for _, elapsed, _ in polls])
    done = sum(j["status"] == "done" for j in jobs.values())
    row = {"clients": args.clients, "jobs": len(seeds) + 1, "in_queue": len(jobs), "done": done,
           "claimed_once": sum(a == 1 for a in claimed.values()), "long_job_runs": long_runs,
           "hostile_sent": sum(answers.values()), "hostile_4xx": sum(n for k, n in answers.items() if k > 0),
           "hostile_statuses": {str(k): n for k, n in sorted(answers.items())},
           "equal_to_cli": equal, "polls": len(polls),
           "busy_polls": int(busy.size), "p50_ms": float(np.percentile(busy, 50) * 1000),
           "p99_ms": float(np.percentile(busy, 99) * 1000), "max_ms": float(busy.max() * 1000),
           "wall_s": wall}  # fmt: skip
    print(f"{'clients':>7} {'jobs':>5} {'in queue':>8} {'done':>5} {'tiny claimed once':>17} {'long runs':>9} "
          f"{'= CLI':>6} {'polls':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'hostile 4xx/sent':>16} "
          f"{'wall s':>7}")  # fmt: skip
    print(f"{row['clients']:>7} {row['jobs']:>5} {row['in_queue']:>8} {row['done']:>5} {row['claimed_once']:>17} "
          f"{row['long_job_runs']:>9} {row['equal_to_cli']:>6} {row['busy_polls']:>6} {row['p50_ms']:>7.1f} "
          f"{row['p99_ms']:>7.1f} {row['max_ms']:>7.1f} {row['hostile_4xx']:>8}/{row['hostile_sent']:<7} "
          f"{row['wall_s']:>7.1f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(row, indent=2))
    assert row["in_queue"] == row["jobs"] == row["done"] == row["claimed_once"] + 1, (
        "a job was lost, failed or run twice"
    )
    assert row["long_job_runs"] == (1 if args.calm else 2), "the long job ran other than once per worker"
    assert row["hostile_4xx"] == row["hostile_sent"], f"a hostile request was not answered 4xx: {answers}"
    assert row["equal_to_cli"] == len(seeds), "a served image differs from the command line's"


if __name__ == "__main__":
    main()
