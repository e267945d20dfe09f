"""`gigadiff serve`: the API's checks and security in process, then real servers with workers running jobs on a
tiny model: events to Deep Zoom tiles, cancelling, and a SIGKILLed server resuming to the same image."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from gigadiff.cli import app as cli_app
from gigadiff.errors import GigadiffError
from gigadiff.options import generate_args
from gigadiff.serve.app import create_app
from gigadiff.serve.client import ApiError, Client, server_sent_events
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.store import JobStore
from tests.helpers.served import LOCAL, served, stop_served

JOB = {"prompt": "a lighthouse", "model": "tiny-sd", "size": "384x256", "steps": 3, "seed": 4, "tile": 256,
       "overlap": 64, "scheduler": "ddim"}  # fmt: skip


def cli_image(tiny_sd_dir, tmp_path, job: dict) -> np.ndarray:
    """The same request run by the command line."""
    out = tmp_path / "cli.tif"
    args = [*generate_args({**job, "model": str(tiny_sd_dir)}), "-o", str(out), "--quiet"]
    result = CliRunner().invoke(cli_app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tifffile.imread(out)


def test_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(GigadiffError, match="needs a token") as e:
        ServeConfig(data=tmp_path, host="0.0.0.0")
    assert e.value.fields == ("token",)
    assert ServeConfig(data=tmp_path, host="0.0.0.0", token="s3cret").token == "s3cret"
    with pytest.raises(GigadiffError, match="is not a folder"):
        ServeConfig(data=tmp_path, models=tmp_path / "missing")
    with pytest.raises(GigadiffError, match="unknown device 'gpu0'"):
        ServeConfig(data=tmp_path, devices=("cuda:0", "gpu0"))
    with pytest.raises(GigadiffError, match="max_steps"):
        ServeConfig(data=tmp_path, max_steps=0)


def test_bad_requests_get_the_command_lines_message_and_queue_nothing(api, config, tiny_sd_dir):
    cli = CliRunner().invoke(cli_app, ["generate", "x", "--model", str(tiny_sd_dir), "--size", "257x192", "-o",
                                       "never.png"])  # fmt: skip
    assert cli.exit_code == 2
    expected = cli.output.strip().removeprefix("error: ")
    r = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd", "size": "257x192"})
    assert r.status_code == 400 and r.json() == {"error": expected}
    cases = {
        "not json": (b"{prompt", "not valid JSON"),
        "a list": (b"[1]", "a job is a JSON object"),
        "type": (json.dumps({"steps": "many"}).encode(), "--steps must be int"),
        "unknown option": (json.dumps({"promt": "x"}).encode(), "unknown option(s) promt"),
        "unknown model": (json.dumps({"model": "nope"}).encode(), "unknown --model 'nope'"),
        "too many steps": (json.dumps({"model": "tiny-sd", "steps": 201}).encode(), "limit of 200"),
        "too large": (json.dumps({"model": "tiny-sd", "size": "16392x512"}).encode(), "limit of 16384 px"),
        "bad scheduler": (json.dumps({"model": "tiny-sd", "scheduler": "warp"}).encode(), "--scheduler"),
    }
    for name, (body, words) in cases.items():
        r = api.post("/api/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, name
        assert words in r.json()["error"], (name, r.json())
    assert api.get("/api/jobs").json() == {"jobs": [], "counts": {}}
    assert not list(config.jobs.iterdir()), "a refused job left files"


def test_clients_never_name_a_server_path(api, config, tmp_path):
    for field in ("output", "checkpoint", "preview", "save_latent", "device"):
        r = api.post("/api/jobs", json={"model": "tiny-sd", field: str(tmp_path / "x")})
        assert r.status_code == 400 and "set by the server" in r.json()["error"]
    for model in ("../tiny-sd", str(config.models / "tiny-sd"), "/etc/passwd", "a/b/c", "..", "tiny-sd/../x"):
        r = api.post("/api/jobs", json={"model": model})
        assert r.status_code == 400, model
    r = api.post("/api/jobs", json={"model": "tiny-sd", "init": "/etc/hosts"})
    assert r.status_code == 400 and "data:image" in r.json()["error"]
    job = api.post("/api/jobs", json={"prompt": "fine", "model": "tiny-sd"}).json()["id"]
    for path in (f"/api/jobs/{job[:-1]}x", "/api/jobs/..%2F..%2Fjobs.db", "/api/jobs/../jobs.db",
                 f"/api/jobs/{job}/files/..%2F..%2Fjobs.db", f"/api/jobs/{job}/files/jobs.db",
                 f"/api/jobs/{job}/image_files/8/..%2F0_0.jpeg", f"/api/jobs/{job}/image_files/x/0_0.jpeg",
                 "/static/..%2F..%2Fapp.py"):  # fmt: skip
        assert api.get(path).status_code in (400, 404), path


def test_a_queued_job_cancels_at_once(api):
    job = api.post("/api/jobs", json={"prompt": "one", "model": "tiny-sd"})
    assert job.status_code == 201
    job_id, seed = job.json()["id"], job.json()["seed"]
    queued = api.get(f"/api/jobs/{job_id}").json()
    assert queued["status"] == "queued"
    assert isinstance(seed, int) and queued["request"]["seed"] == seed  # drawn once: a resumed job keeps it
    r = api.delete(f"/api/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert api.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"
    assert api.get(f"/api/jobs/{job_id}/image").status_code == 404
    gone = api.delete(f"/api/jobs/{job_id}")  # a finished job: deleted
    assert gone.status_code == 200 and gone.json() == {"id": job_id, "status": "deleted"}
    assert api.get(f"/api/jobs/{job_id}").status_code == 404 and api.delete(f"/api/jobs/{job_id}").status_code == 404
    assert api.delete("/api/jobs/" + "0" * 32).status_code == 404


def test_finished_jobs_are_deleted_with_their_files_on_request_or_after_the_retention(config, tmp_path):
    from dataclasses import replace

    from gigadiff.serve.supervisor import Supervisor

    kept = replace(config, keep_days=1.0)
    api = TestClient(create_app(kept), base_url=LOCAL)
    store = api.app.state.store
    old, recent, running = (api.post("/api/jobs", json={"prompt": p, "model": "tiny-sd"}).json()["id"]
                            for p in ("old", "recent", "running"))  # fmt: skip
    for job_id in (old, recent):
        (kept.jobs / job_id).mkdir(parents=True)
        (kept.jobs / job_id / "image.tif").write_bytes(b"x")
    while (job := store.claim()) is not None and job.id != running:
        store.finish(job.id, "done", outputs=["image.tif"])
    with store._connect() as db:  # ended two days ago
        db.execute("UPDATE jobs SET finished = ? WHERE id = ?", (time.time() - 2 * 86400, old))
    Supervisor(kept, lambda *a: None).expire()
    assert api.get(f"/api/jobs/{old}").status_code == 404 and not (kept.jobs / old).exists()
    assert api.get(f"/api/jobs/{recent}").json()["status"] == "done" and (kept.jobs / recent).exists()
    assert api.get(f"/api/jobs/{running}").json()["status"] == "running", "unfinished jobs are never expired"
    assert api.delete(f"/api/jobs/{recent}").json()["status"] == "deleted" and not (kept.jobs / recent).exists()


def test_one_client_may_have_only_so_many_jobs_waiting(config):
    from dataclasses import replace

    api = TestClient(create_app(replace(config, max_queued=2)), base_url=LOCAL)
    first, second = (api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd"}) for _ in range(2))
    assert first.status_code == second.status_code == 201
    third = api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd"})
    assert third.status_code == 429 and "2 jobs waiting or running" in third.json()["error"]
    assert api.delete(f"/api/jobs/{first.json()['id']}").json()["status"] == "cancelled"
    assert api.post("/api/jobs", json={"prompt": "x", "model": "tiny-sd"}).status_code == 201


def test_token_guards_every_route_but_the_login(config, tmp_path):
    guarded = TestClient(create_app(ServeConfig(data=tmp_path / "guarded", host="0.0.0.0", token="s3cret",
                                                models=config.models)))  # fmt: skip
    for path in ("/api/jobs", "/api/models", "/docs", "/openapi.json", "/static/app.js"):
        assert guarded.get(path).status_code == 401, path
    assert guarded.post("/api/jobs", json={"model": "tiny-sd"}).status_code == 401
    assert guarded.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    page = guarded.get("/", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert guarded.get("/login").status_code == 200
    bearer = {"Authorization": "Bearer s3cret"}
    assert guarded.get("/api/jobs", headers=bearer).status_code == 200
    wrong = guarded.post("/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.headers["location"] == "/login?wrong=1"
    assert "gigadiff_token" not in guarded.cookies
    login = guarded.post("/login", data={"token": "s3cret"}, follow_redirects=False)
    assert login.status_code == 303 and "httponly" in login.headers["set-cookie"].lower()
    assert guarded.get("/").status_code == 200 and guarded.get("/api/jobs").status_code == 200  # the cookie


def test_request_size_is_limited(config, tmp_path):
    small = TestClient(create_app(ServeConfig(data=tmp_path / "small", models=config.models, max_request_mb=0.01)),
                       base_url=LOCAL)  # fmt: skip
    big = {"prompt": "x" * 20000, "model": "tiny-sd"}
    r = small.post("/api/jobs", json=big)
    assert r.status_code == 413 and "at most 10485 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(20):
            yield b" " * 1000

    r = small.post("/api/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert small.get("/api/jobs").json()["jobs"] == []


def _tile(client: Client, job_id: str, level: int, col: int, row: int, fmt: str = "png") -> np.ndarray:
    data = client.request("GET", f"/api/jobs/{job_id}/image_files/{level}/{col}_{row}.{fmt}")[1]
    return np.asarray(Image.open(io.BytesIO(data)))


def test_the_event_stream_loses_no_step_of_a_job_that_ends_within_one_poll(api, monkeypatch):
    """The job's whole run (five steps and its end) is written while the stream waits for its next read: every
    step still reaches the stream, in order, ten times over."""
    store: JobStore = api.app.state.store
    watching = threading.Event()
    watch = JobStore.watch

    def watched(self: JobStore, job_id: str):
        try:
            return watch(self, job_id)
        finally:
            watching.set()

    monkeypatch.setattr(JobStore, "watch", watched)
    for _ in range(10):
        watching.clear()
        job = store.submit({"prompt": "x"})
        assert store.claim().id == job.id

        def run_at_once(job_id: str = job.id) -> None:
            assert watching.wait(timeout=60)
            for step in range(1, 6):
                store.progress(job_id, step=step, steps=5, phase="denoising")
            store.finish(job_id, "done")

        worker = threading.Thread(target=run_at_once)
        worker.start()
        response = api.get(f"/api/jobs/{job.id}/events")
        worker.join()
        events = list(server_sent_events(response.text.splitlines()))
        running = [d["step"] for k, d in events if k == "progress" and d["status"] == "running"]
        assert running == [0, 1, 2, 3, 4, 5]
        assert [k for k, _ in events][-2:] == ["progress", "end"] and events[-1][1]["status"] == "done"


def test_a_job_runs_from_request_to_deep_zoom_tiles(tiny_sd_dir, tmp_path):
    expected = cli_image(tiny_sd_dir, tmp_path, JOB)
    with served(tmp_path / "data", "--models", str(tiny_sd_dir.parent)) as (url, _):
        client = Client(url)
        job_id = client.submit(JOB)
        events = list(client.events(job_id))
        kinds = [k for k, _ in events]
        assert kinds[-1] == "end" and events[-1][1]["status"] == "done", events[-1]
        running = [d for k, d in events if k == "progress" and d["status"] == "running"]
        steps = [d["step"] for d in running]
        assert steps == sorted(steps) and {1, 2, 3} <= set(steps), steps  # every step, in order
        assert max(d["tiles"] for d in running) == max(d["tiles_total"] for d in running) == 3 * 2
        previews = [d for k, d in events if k == "preview"]
        assert previews and all(p["image"].startswith("data:image/jpeg;base64,") for p in previews)
        job = client.job(job_id)
        assert (job["step"], job["steps"], job["error"]) == (3, 3, None)
        assert job["outputs"] == ["image.tif", "image.json"] and job["dzi"].endswith("/image.dzi")
        image = tifffile.imread(client.download(job_id, tmp_path / "served.tif"))
        np.testing.assert_array_equal(image, expected)  # the same request through the command line
        meta = json.loads(client.request("GET", f"/api/jobs/{job_id}/files/image.json")[1])
        assert (meta["width"], meta["height"], meta["seed"], meta["steps"]) == (384, 256, 4, 3)

        root = ET.fromstring(client.request("GET", job["dzi"])[1])
        size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
        assert root.attrib["TileSize"] == "256" and (size.attrib["Width"], size.attrib["Height"]) == ("384", "256")
        top = 9  # ceil(log2(384))
        np.testing.assert_array_equal(_tile(client, job_id, top, 0, 0), expected[:, :256])
        np.testing.assert_array_equal(_tile(client, job_id, top, 1, 0), expected[:, 256:])
        assert _tile(client, job_id, top - 1, 0, 0).shape == (128, 192, 3)
        assert _tile(client, job_id, 0, 0, 0, "jpeg").shape == (1, 1, 3)
        with pytest.raises(ApiError) as e:
            _tile(client, job_id, top, 2, 0)
        assert e.value.status == 404

        terrain = client.submit({"model": "terrain", "size": "256x128", "seed": 2})
        job = client.wait(terrain, timeout=300)
        assert job["status"] == "done", job["error"]
        assert job["outputs"][0] == "image.tif" and "image.relief.tif" in job["outputs"]
        heights = tifffile.imread(client.download(terrain, tmp_path / "heights.tif"))
        assert heights.shape == (128, 256) and heights.dtype == np.float32
        assert _tile(client, terrain, 8, 0, 0).shape == (128, 256, 3)  # the shaded relief, in Deep Zoom
    log = (tmp_path / "data.serve.log").read_text()
    for line in (f"job {job_id} queued: model tiny-sd, size 384x256, steps 3", f"job {job_id} started on auto",
                 f"job {job_id} done in ", f"job {terrain} done in ", "gigadiff serve: stopping\n",
                 "gigadiff serve: stopped\n"):  # fmt: skip
        assert line in log, line


def test_a_running_job_cancels_without_output(tiny_sd_dir, tmp_path):
    data = tmp_path / "data"
    with served(data, "--models", str(tiny_sd_dir.parent)) as (url, _):
        client = Client(url)
        long = client.submit({**JOB, "steps": 150, "size": "768x512"})
        queued = client.submit(JOB)
        job = client.wait(long, until=("running",), timeout=120)
        while job["step"] < 1:
            job = client.job(long)
            time.sleep(0.1)
        assert client.cancel(long)["cancel"] is True
        job = client.wait(long, timeout=60)
        assert job["status"] == "cancelled" and job["outputs"] == []
        assert not (data / "jobs" / long).exists(), "a cancelled job left files"
        assert client.wait(queued, timeout=120)["status"] == "done"  # the worker goes on with the queue
    log = (tmp_path / "data.serve.log").read_text()
    assert f"job {long} cancelled after " in log and f"job {long}: cancel asked (stopping it)" in log


@pytest.mark.slow
def test_a_killed_server_resumes_its_job_to_the_same_image(tiny_sd_dir, tmp_path):
    job = {**JOB, "steps": 12}
    expected = cli_image(tiny_sd_dir, tmp_path, job)
    data, models = tmp_path / "data", str(tiny_sd_dir.parent)
    with served(data, "--models", models) as (url, proc):
        client = Client(url)
        first = client.submit(job)
        second = client.submit({**JOB, "seed": 5})
        status = client.wait(first, until=("running",))
        while status["step"] < 4:
            status = client.job(first)
            time.sleep(0.05)
        stop_served(proc, 9)  # SIGKILL, server and worker alike: a crash
    store = JobStore(data / "jobs.db")
    assert store.get(first).status == "running" and store.get(second).status == "queued"
    assert (data / "jobs" / first / "checkpoint.safetensors").is_file()
    with served(data, "--models", models) as (url, _):
        client = Client(url)
        done = client.wait(first, timeout=300)
        assert done["status"] == "done" and done["attempts"] == 2
        image = tifffile.imread(client.download(first, tmp_path / "resumed.tif"))
        np.testing.assert_array_equal(image, expected)
        assert client.wait(second, timeout=300)["status"] == "done"
        assert not (data / "jobs" / first / "checkpoint.safetensors").exists()


def _kill_worker_of(client: Client, store: JobStore, job_id: str, at_step: int) -> int:
    """SIGKILL the worker running `job_id` once the job has passed `at_step` (it checkpoints every step)."""
    status = client.wait(job_id, until=("running",), timeout=300)
    while status["step"] < at_step:
        status = client.job(job_id)
        time.sleep(0.05)
    pid = store.get(job_id).worker
    assert pid is not None
    os.kill(pid, 9)
    return pid


def test_a_killed_workers_job_resumes_or_fails_once_its_attempts_are_spent(tiny_sd_dir, tmp_path):
    """A job whose worker is SIGKILLed resumes on the replacement worker to the uninterrupted image; one whose
    worker dies under it as often as the server allows fails with that reason, and the queue moves on."""
    job = {**JOB, "steps": 8}
    expected = cli_image(tiny_sd_dir, tmp_path, job)
    data = tmp_path / "data"
    with served(data, "--models", str(tiny_sd_dir.parent), "--max-attempts", "2") as (url, _):
        client, store = Client(url), JobStore(data / "jobs.db")
        resumed = client.submit(job)
        doomed = client.submit({**JOB, "steps": 40, "seed": 8})
        after = client.submit(JOB)
        killed = _kill_worker_of(client, store, resumed, at_step=2)
        done = client.wait(resumed, timeout=300)
        assert done["status"] == "done" and done["attempts"] == 2, done
        assert (done["step"], done["steps"]) == (8, 8), "a resumed job goes on counting its steps"
        assert store.get(resumed).worker is None
        np.testing.assert_array_equal(tifffile.imread(client.download(resumed, tmp_path / "resumed.tif")), expected)
        for _ in range(2):  # --max-attempts
            _kill_worker_of(client, store, doomed, at_step=0)
            status = client.job(doomed)
            while status["status"] == "running":
                status = client.job(doomed)
                time.sleep(0.05)
        failed = client.wait(doomed, timeout=60)
        assert failed["status"] == "failed" and failed["attempts"] == 2
        assert failed["error"] == "its worker died (SIGKILL), 2 times: not tried again"
        assert not (data / "jobs" / doomed).exists()
        assert client.wait(after, timeout=300)["status"] == "done"
    log = (tmp_path / "data.serve.log").read_text()
    assert f"job {resumed}: its worker died (SIGKILL); queued again to resume" in log
    assert f"worker on auto (pid {killed}): died (SIGKILL) after" in log


def test_a_second_server_on_the_same_data_is_refused(tmp_path):
    import subprocess
    import sys

    with served(tmp_path / "data") as (url, _):
        port = url.rsplit(":", 1)[1]
        busy = subprocess.run([sys.executable, "-m", "gigadiff", "serve", "--data", str(tmp_path / "other"), "--port",
                               port], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr and "--port" in busy.stderr
        again = subprocess.run([sys.executable, "-m", "gigadiff", "serve", "--data", str(tmp_path / "data"), "--port",
                                "0"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert again.returncode == 2 and "is in use by another gigadiff serve" in again.stderr
    open_host = subprocess.run([sys.executable, "-m", "gigadiff", "serve", "--host", "0.0.0.0", "--data",
                                str(tmp_path / "x")], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "GIGADIFF_TOKEN": ""})  # fmt: skip
    assert open_host.returncode == 2 and "needs a token: give --token or set GIGADIFF_TOKEN" in open_host.stderr
