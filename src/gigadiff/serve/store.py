"""The service's job queue: one SQLite database under the data folder, shared by the API and its workers.

SQLite in WAL mode lets the API read while a worker writes. A job moves queued -> running -> done / failed /
cancelled; `claim` takes the oldest queued job in one transaction (BEGIN IMMEDIATE), so no job is run twice
even with several workers. After a crash (the server killed), `recover` puts jobs left `running` back in the
queue: their worker resumes them from their last checkpoint. Timestamps are seconds since the epoch.

Every change of a job's state (submitted, claimed, each progress report, finished, cancelled, recovered) is also
appended to an `events` table, numbered in order, in the same transaction as the change: a client's event
stream reads the changes after the last one it sent, so a step is never lost between two reads however fast
the job runs (a snapshot of the job row alone would skip the states it went through in between).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ADDED_COLUMNS = {"tiles_total": "INTEGER NOT NULL DEFAULT 0", "worker": "INTEGER", "client": "TEXT", "runs_on": "TEXT"}
"""Columns added to the jobs table since its first version, with their declarations."""
EVENT_OMITS = ("id", "request", "worker", "client")
"""Columns an event does not repeat (a request may hold megabytes of data URLs)."""
FINISHED = ("done", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    tiles INTEGER NOT NULL DEFAULT 0,
    tiles_total INTEGER NOT NULL DEFAULT 0,
    worker INTEGER,
    client TEXT,
    runs_on TEXT,
    phase TEXT NOT NULL DEFAULT '',
    eta REAL,
    error TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    cancel INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job, seq);
"""


@dataclass
class Job:
    id: str
    status: str
    request: dict[str, Any]
    created: float
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    tiles: int = 0
    """Model-call tiles done so far (over every step, and every coherence stage begun)."""
    tiles_total: int = 0
    """The tiles of every step begun and still to come: `tiles / tiles_total` is the job's progress."""
    phase: str = ""
    eta: float | None = None
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    cancel: bool = False
    attempts: int = 0
    updated: float = 0.0
    worker: int | None = None
    """The process id of the worker running it (while it runs)."""
    client: str | None = None
    """Who submitted it (the client's address), for the per-client limit on waiting jobs."""
    runs_on: str | None = None
    """Where it runs, or last ran: its worker's device, or the Ray node (its address and id)."""

    def public(self) -> dict[str, Any]:
        """What the API shows of a job."""
        out = asdict(self)
        out.pop("cancel")
        return out


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["request"] = json.loads(data["request"])
    data["outputs"] = json.loads(data["outputs"])
    data["cancel"] = bool(data["cancel"])
    return Job(**data)


class JobStore:
    """Jobs in `path` (created with its tables if new)."""

    def __init__(self, path: Path):
        self.path = path
        self._open = threading.local()
        """This thread's transaction while `together` holds one open."""
        with self._connect() as db:
            db.executescript(SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, declaration in ADDED_COLUMNS.items():  # a database made by an earlier version
                if column not in columns:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Changes made in this thread inside share one write transaction, all kept or (on an error) none: the
        Ray supervisor moves each batch of its tasks' reports so, rather than a transaction (and a connection)
        per report beside the API's reads."""
        with self._change() as db:
            self._open.db = db
            try:
                yield
            finally:
                self._open.db = None

    @contextmanager
    def _change(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (inside `together`: its transaction); `_record` inside it appends the changed jobs'
        states to the events."""
        shared = getattr(self._open, "db", None)
        if shared is not None:
            yield shared
            return
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    def _record(db: sqlite3.Connection, job_id: str) -> None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is not None:
            state = {k: row[k] for k in row.keys() if k not in EVENT_OMITS}  # noqa: SIM118 - a Row iterates values
            db.execute("INSERT INTO events (job, state) VALUES (?, ?)", (job_id, json.dumps(state)))

    def submit(self, request: dict[str, Any], client: str | None = None, limit: int | None = None) -> Job | None:
        """Queue a job; None if `client` already has `limit` jobs queued or running (checked in the same
        transaction, so that concurrent submissions cannot pass it together)."""
        now = time.time()
        job = Job(uuid.uuid4().hex, "queued", request, now, updated=now, client=client)
        with self._change() as db:
            if limit is not None and client is not None:
                waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE client = ? AND status IN ('queued', 'running')",
                                     (client,)).fetchone()[0]  # fmt: skip
                if waiting >= limit:
                    return None
            db.execute("INSERT INTO jobs (id, status, request, created, updated, client) VALUES (?, ?, ?, ?, ?, ?)",
                       (job.id, job.status, json.dumps(request), now, now, client))  # fmt: skip
            self._record(db, job.id)
        return job

    def delete(self, job_id: str, files: Path | None = None) -> bool:
        """Forget a finished job (its row, its events and its folder of `files`); False if it is not finished
        (or not there)."""
        with self._change() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] not in FINISHED:
                return False
            db.execute("DELETE FROM events WHERE job = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if files is not None:
            shutil.rmtree(files, ignore_errors=True)
        return True

    def finished_before(self, cutoff: float) -> list[str]:
        """Jobs that ended before `cutoff` (seconds since the epoch), for retention."""
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status IN ('done', 'failed', 'cancelled') AND "
                              "COALESCE(finished, updated) < ?", (cutoff,)).fetchall()  # fmt: skip
        return [r["id"] for r in rows]

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def watch(self, job_id: str) -> tuple[Job | None, int]:
        """A job and the number of its last event, read together: its events after that number are its changes
        since this state."""
        with self._connect() as db:
            db.execute("BEGIN")
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            last = db.execute("SELECT MAX(seq) FROM events WHERE job = ?", (job_id,)).fetchone()[0]
            db.execute("COMMIT")
        return (_job(row) if row else None), int(last or 0)

    def events(self, job: Job, after: int) -> list[tuple[int, Job]]:
        """The states `job` went through after event number `after`, in order, with their numbers."""
        with self._connect() as db:
            rows = db.execute("SELECT seq, state FROM events WHERE job = ? AND seq > ? ORDER BY seq",
                              (job.id, after)).fetchall()  # fmt: skip
        states = []
        for row in rows:
            state = json.loads(row["state"])
            state["outputs"] = json.loads(state["outputs"])
            state["cancel"] = bool(state["cancel"])
            states.append((int(row["seq"]), replace(job, **state)))
        return states

    def recent(self, limit: int = 200) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def claim(self, worker: int | None = None, runs_on: str | None = None) -> Job | None:
        """Take the oldest queued job for a worker (running from now, by process `worker` on `runs_on`), or None."""
        with self._change() as db:
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            db.execute("UPDATE jobs SET status = 'running', started = COALESCE(started, ?), attempts = attempts + 1, "
                       "worker = ?, runs_on = ?, updated = ? WHERE id = ?",
                       (now, worker, runs_on, now, row["id"]))  # fmt: skip
            self._record(db, row["id"])
        return self.get(row["id"])

    def progress(self, job_id: str, **values: Any) -> None:
        """Record a running job's progress: step, steps, tiles, tiles_total, phase, eta."""
        columns = ", ".join(f"{k} = ?" for k in values)
        with self._change() as db:
            db.execute(f"UPDATE jobs SET {columns}, updated = ? WHERE id = ?",
                       (*values.values(), time.time(), job_id))  # fmt: skip
            self._record(db, job_id)

    def finish(self, job_id: str, status: str, error: str | None = None, outputs: list[str] | None = None) -> None:
        assert status in FINISHED
        now = time.time()
        with self._change() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, outputs = ?, finished = ?, eta = NULL, phase = '', "
                       "worker = NULL, updated = ? WHERE id = ?",
                       (status, error, json.dumps(outputs or []), now, now, job_id))  # fmt: skip
            self._record(db, job_id)

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, or ask a running one to stop; returns its status after, or None."""
        now = time.time()
        with self._change() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            status = row["status"]
            if status == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, updated = ? WHERE id = ?",
                           (now, now, job_id))  # fmt: skip
                status = "cancelled"
            elif status == "running":
                db.execute("UPDATE jobs SET cancel = 1, updated = ? WHERE id = ?", (now, job_id))
            self._record(db, job_id)
        return status

    def cancelled(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel"])

    def recover(self, max_attempts: int) -> dict[str, list[str]]:
        """Jobs left running by a killed server: see `orphaned`."""
        return self.orphaned(None, "the server stopped while it ran", max_attempts)

    def orphaned(self, worker: int | None, reason: str, max_attempts: int,
                 job_id: str | None = None) -> dict[str, list[str]]:  # fmt: skip
        """The running jobs of a worker that died (every running job when `worker` is None: the server died; only
        job `job_id` if given: its Ray task was lost with its node):
        cancelled if their cancel was asked, failed with `reason` once tried `max_attempts` times (a job that kills
        its worker is not run forever), otherwise queued again to resume from their checkpoint. Returns the job
        ids by new status."""
        outcome: dict[str, list[str]] = {"queued": [], "failed": [], "cancelled": []}
        with self._change() as db:
            rows = db.execute("SELECT id, cancel, attempts FROM jobs WHERE status = 'running' AND "
                              "(? IS NULL OR worker = ?) AND (? IS NULL OR id = ?)",
                              (worker, worker, job_id, job_id)).fetchall()  # fmt: skip
            now = time.time()
            for row in rows:
                if row["cancel"]:
                    status, error, finished = "cancelled", None, now
                elif row["attempts"] >= max_attempts:
                    status, finished = "failed", now
                    error = f"{reason}, {row['attempts']} times: not tried again"
                else:
                    status, error, finished = "queued", None, None
                db.execute("UPDATE jobs SET status = ?, error = ?, finished = ?, worker = NULL, eta = NULL, "
                           "phase = '', updated = ? WHERE id = ?",
                           (status, error, finished, now, row["id"]))  # fmt: skip
                self._record(db, row["id"])
                outcome[status].append(row["id"])
        return outcome

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}
