"""`gigadiff serve --ray`: jobs as Ray tasks on a cluster of two nodes simulated on this machine
(`ray.cluster_utils.Cluster`), on the loopback address only: the jobs spread over the nodes, and a job whose node
is killed under it resumes on the other from its checkpoint to the image an uninterrupted run makes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from gigadiff.cli import app as cli_app
from gigadiff.serve.client import Client
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.ray_pool import RaySupervisor
from gigadiff.serve.store import JobStore
from tests.helpers.served import served

JOB = {"prompt": "a lighthouse", "model": "tiny-sd", "size": "384x256", "steps": 24, "seed": 4, "tile": 256,
       "overlap": 64, "scheduler": "ddim"}  # fmt: skip


def test_serve_refuses_a_ray_address_where_nothing_answers_and_devices_beside_ray(tmp_path):
    runner = CliRunner()
    started = time.monotonic()
    result = runner.invoke(cli_app, ["serve", "--data", str(tmp_path / "d"), "--ray", "127.0.0.1:1"])
    assert result.exit_code == 2 and time.monotonic() - started < 30  # Ray alone would retry for minutes
    assert "nothing answers at --ray 127.0.0.1:1" in result.output and "ray start --head" in result.output
    result = runner.invoke(cli_app, ["serve", "--data", str(tmp_path / "d"), "--ray", "auto", "--devices", "cpu"])
    assert result.exit_code == 2 and "--devices names this machine's workers; with --ray" in result.output
    assert not (tmp_path / "d").exists(), "nothing is made for a server that does not start"


class FakeTask:
    """Stands for the Ray task: records what each submission asked for."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def options(self, **amount: int) -> FakeTask:
        self.amount = amount
        return self

    def remote(self, job, config, board, server_address) -> object:
        self.sent.append((job.id, self.amount))
        return object()


def test_jobs_are_sent_while_the_cluster_has_room_and_refused_when_no_node_could_hold_them(tmp_path):
    """The dispatch alone: GPUs asked per process, no more jobs claimed than the cluster's GPUs can start, and a
    job asking for more processes than the largest node has GPUs fails with why instead of waiting forever."""
    config = ServeConfig(data=tmp_path, ray="127.0.0.1:6379")
    supervisor = RaySupervisor(config)
    supervisor.task, supervisor.resource, supervisor.capacity, supervisor.per_node = FakeTask(), "GPU", 3, 2
    store = supervisor.store
    big = store.submit({"prompt": "a", "processes": 4}).id
    pair = store.submit({"prompt": "b", "processes": 2}).id
    one = store.submit({"prompt": "c"}).id
    waiting = store.submit({"prompt": "d"}).id
    supervisor._dispatch()
    assert supervisor.task.sent == [(pair, {"num_gpus": 2}), (one, {"num_gpus": 1})]
    assert store.get(big).status == "failed"
    assert store.get(big).error == "it asks for 4 processes, and no node of the Ray cluster has 4 GPUs"
    assert store.get(waiting).status == "queued", "3 GPUs are busy: the fourth job waits in the queue"
    supervisor._dispatch()
    assert len(supervisor.task.sent) == 2


@pytest.fixture
def cluster():
    """A head without CPUs (it runs the server's board only) and two nodes of one CPU each: one job per node (on
    127.0.0.1: tests/conftest.py keeps Ray off the machine's interface)."""
    from ray.cluster_utils import Cluster

    simulated = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [simulated.add_node(num_cpus=1) for _ in range(2)]
    simulated.wait_for_nodes()
    yield simulated, nodes
    simulated.shutdown()


def _running_on(client: Client, job_id: str, at_step: int) -> str:
    """Where `job_id` runs, once it has passed `at_step` (it checkpoints every step)."""
    status = client.wait(job_id, until=("running",), timeout=300)
    while status["step"] < at_step or not (status["runs_on"] or "").startswith("ray node"):
        assert status["status"] == "running", status
        time.sleep(0.05)
        status = client.job(job_id)
    return status["runs_on"]


@pytest.mark.slow
def test_jobs_spread_over_the_nodes_and_a_job_whose_node_dies_resumes_to_the_same_image(cluster, tiny_sd_dir, tmp_path):
    simulated, nodes = cluster
    assert simulated.address.startswith("127.0.0.1:")
    data = tmp_path / "data"
    with served(data, "--models", str(tiny_sd_dir.parent), "--ray", simulated.address) as (url, _):
        client, store = Client(url), JobStore(data / "jobs.db")
        lost = client.submit(JOB)
        whole = client.submit(JOB)  # the same request, on the other node, uninterrupted
        where = _running_on(client, lost, at_step=2)
        assert _running_on(client, whole, at_step=0) != where, "two jobs, two nodes of one CPU: one job on each"
        node = next(n for n in nodes if n.node_id[:12] in where)
        simulated.remove_node(node)  # the node and its Ray worker die mid-job
        done = client.wait(lost, timeout=300)
        assert done["status"] == "done" and done["attempts"] == 2, done
        assert done["runs_on"] != where and (done["step"], done["steps"]) == (24, 24)
        states = [job for _, job in store.events(store.get(lost), 0)]
        requeued = next(i for i, job in enumerate(states) if job.status == "queued" and i > 0)
        resumed_steps = {job.step for job in states[requeued:] if job.status == "running" and job.steps}
        assert 0 < min(resumed_steps) < 24, f"resumed from its checkpoint with steps left: {sorted(resumed_steps)}"
        assert client.wait(whole, timeout=300)["status"] == "done"
        resumed = tifffile.imread(client.download(lost, tmp_path / "resumed.tif"))
        uninterrupted = tifffile.imread(client.download(whole, tmp_path / "whole.tif"))
        np.testing.assert_array_equal(resumed, uninterrupted)
        assert not (data / "jobs" / lost / "checkpoint.safetensors").exists()
        assert store.get(lost).worker is None

        long = client.submit({**JOB, "steps": 200, "seed": 9})
        _running_on(client, long, at_step=1)
        assert client.cancel(long)["cancel"] is True  # to the task through the server's board
        assert client.wait(long, timeout=120)["status"] == "cancelled"
        assert not (data / "jobs" / long).exists(), "a cancelled job left files"
    log = (tmp_path / "data.serve.log").read_text()
    assert f"job {lost}: its Ray node died; queued again to resume" in log
    assert "jobs on the Ray cluster at 127.0.0.1:" in log and "(3 node(s), 2 CPU)" in log
