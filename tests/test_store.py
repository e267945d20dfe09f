"""The service's job store: each job claimed once, oldest first, cancelled and recovered as its status says."""

from __future__ import annotations

import multiprocessing

from gigadiff.serve.store import JobStore

ROUNDS, WORKERS = 10, 4


def _claim_in_rounds(path: str, barrier, queue: multiprocessing.Queue) -> None:
    """Claim one job per round; every round starts when all workers are at the barrier, so the claims race."""
    store = JobStore(path)
    got = []
    for _ in range(ROUNDS):
        barrier.wait(timeout=60)
        job = store.claim()
        got.append(None if job is None else job.id)
    queue.put(got)


def test_concurrent_workers_claim_every_job_once_oldest_first(tmp_path):
    """Four processes claim at the same moment, ten times: 40 jobs, each claimed exactly once, every worker one
    per round, each worker's jobs in submission order."""
    store = JobStore(tmp_path / "jobs.db")
    ids = [store.submit({"seed": i}).id for i in range(ROUNDS * WORKERS)]
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()
    barrier = context.Barrier(WORKERS)
    workers = [context.Process(target=_claim_in_rounds, args=(str(tmp_path / "jobs.db"), barrier, queue))
               for _ in range(WORKERS)]  # fmt: skip
    for w in workers:
        w.start()
    claimed = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    assert all(None not in got and len(got) == ROUNDS for got in claimed)  # nobody found the queue empty early
    flat = [job_id for got in claimed for job_id in got]
    assert sorted(flat) == sorted(ids), "a job was lost or claimed twice"
    for got in claimed:  # each worker took its jobs in submission order
        assert got == sorted(got, key=ids.index)
    assert store.counts() == {"running": ROUNDS * WORKERS}
    assert all(store.get(i).attempts == 1 for i in ids)


def test_cancel_finish_and_recover(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    queued, running, asked, done = (store.submit({"n": i}).id for i in range(4))
    assert store.request_cancel(queued) == "cancelled" and store.get(queued).status == "cancelled"
    for job_id in (running, asked, done):
        assert store.claim().id == job_id
    assert store.claim() is None
    assert store.request_cancel(asked) == "running" and store.cancelled(asked) and not store.cancelled(running)
    store.progress(running, step=3, steps=10, tiles=12, phase="denoising", eta=4.5)
    job = store.get(running)
    assert (job.step, job.steps, job.tiles, job.phase, job.eta) == (3, 10, 12, "denoising", 4.5)
    store.finish(done, "done", outputs=["image.tif", "image.json"])
    assert store.get(done).outputs == ["image.tif", "image.json"] and store.get(done).finished is not None
    assert store.request_cancel(done) == "done" and store.request_cancel("0" * 32) is None
    # a killed server: its running job goes back to the queue, one it was asked to cancel is cancelled
    assert store.recover(max_attempts=3) == {"queued": [running], "failed": [], "cancelled": [asked]}
    assert store.get(running).status == "queued" and store.get(asked).status == "cancelled"
    assert store.get(asked).finished is not None, "a job cancelled while its server was down has ended"
    again = store.claim(worker=4242)
    assert again.id == running and again.attempts == 2 and again.started == job.started and again.worker == 4242
    assert "cancel" not in again.public()


def test_a_dead_workers_job_resumes_until_it_has_killed_its_worker_too_often(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job, bystander = store.submit({"n": 1}).id, store.submit({"n": 2}).id
    assert store.claim(worker=11).id == job and store.claim(worker=12).id == bystander
    for attempt in (1, 2):
        assert store.orphaned(11, "its worker died (SIGKILL)", max_attempts=3)["queued"] == [job]
        assert store.get(job).status == "queued" and store.get(bystander).status == "running"
        assert store.claim(worker=11).attempts == attempt + 1
    assert store.orphaned(11, "its worker died (SIGKILL)", max_attempts=3)["failed"] == [job]
    failed = store.get(job)
    assert failed.status == "failed" and failed.error == "its worker died (SIGKILL), 3 times: not tried again"
    assert failed.finished is not None and failed.worker is None
    assert store.get(bystander).status == "running", "another worker's job is not touched"


def test_every_change_of_a_job_is_an_event_in_order(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.submit({"prompt": "x", "init": "data:image/png;base64," + "A" * 1000})
    other = store.submit({"prompt": "y"})
    _, before = store.watch(job.id)
    assert store.claim().id == job.id
    for step in (1, 2, 3):
        store.progress(job.id, step=step, steps=3)
    store.progress(other.id, phase="never claimed")
    store.finish(job.id, "done", outputs=["image.tif"])
    changes = store.events(job, before)
    numbers = [n for n, _ in changes]
    assert numbers == sorted(numbers) and len(changes) == 5
    assert [(j.status, j.step) for _, j in changes] == [("running", 0), ("running", 1), ("running", 2),
                                                         ("running", 3), ("done", 3)]  # fmt: skip
    assert changes[-1][1].outputs == ["image.tif"] and changes[-1][1].request == job.request
    assert store.events(job, numbers[-1]) == []
    now, last = store.watch(job.id)
    assert now.status == "done" and last == numbers[-1]


def test_changes_made_together_are_one_transaction_kept_whole_or_not_at_all(tmp_path, monkeypatch):
    """The Ray supervisor's batch of reports: one connection and transaction for all, every change an event in
    order; an error part-way keeps none of them."""
    import pytest

    store = JobStore(tmp_path / "jobs.db")
    job = store.submit({"prompt": "x"})
    store.claim()
    _, before = store.watch(job.id)
    opened = []
    connect = store._connect

    def counted():
        opened.append(1)
        return connect()

    monkeypatch.setattr(store, "_connect", counted)
    with store.together():
        for step in (1, 2, 3):
            store.progress(job.id, step=step, steps=3)
        store.finish(job.id, "done", outputs=["image.tif"])
    assert len(opened) == 1
    monkeypatch.setattr(store, "_connect", connect)
    assert [(j.status, j.step) for _, j in store.events(job, before)] == [("running", 1), ("running", 2),
                                                                          ("running", 3), ("done", 3)]  # fmt: skip
    second = store.submit({"prompt": "y"})
    store.claim()
    with pytest.raises(RuntimeError), store.together():
        store.progress(second.id, step=1, steps=2)
        raise RuntimeError("a report that cannot be applied")
    assert store.get(second.id).step == 0
    store.progress(second.id, step=2, steps=2)  # the store works on after
    assert store.get(second.id).step == 2
