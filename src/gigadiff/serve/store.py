"""The service's job queue: one SQLite database under the data folder, shared by the API and its workers.

SQLite in WAL mode lets the API read while a worker writes. A job moves queued -> running -> done / failed /
cancelled; `claim` takes the oldest queued job in one transaction (BEGIN IMMEDIATE), so no job is run twice
even with several workers. After a crash (the server killed), `recover` puts jobs left `running` back in the
queue: their worker resumes them from their last checkpoint. Timestamps are seconds since the epoch.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("queued", "running", "done", "failed", "cancelled")
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
    phase TEXT NOT NULL DEFAULT '',
    eta REAL,
    error TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    cancel INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created);
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
    phase: str = ""
    eta: float | None = None
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    cancel: bool = False
    attempts: int = 0
    updated: float = 0.0

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
        with self._connect() as db:
            db.executescript(SCHEMA)

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

    def submit(self, request: dict[str, Any]) -> Job:
        now = time.time()
        job = Job(uuid.uuid4().hex, "queued", request, now, updated=now)
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, status, request, created, updated) VALUES (?, ?, ?, ?, ?)",
                       (job.id, job.status, json.dumps(request), now, now))  # fmt: skip
        return job

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def recent(self, limit: int = 200) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def claim(self) -> Job | None:
        """Take the oldest queued job for a worker (running from now), or None."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute("UPDATE jobs SET status = 'running', started = COALESCE(started, ?), attempts = attempts + 1, "
                       "updated = ? WHERE id = ?", (now, now, row["id"]))  # fmt: skip
            db.execute("COMMIT")
        return self.get(row["id"])

    def progress(self, job_id: str, **values: Any) -> None:
        """Record a running job's progress: step, steps, tiles, phase, eta."""
        columns = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {columns}, updated = ? WHERE id = ?",
                       (*values.values(), time.time(), job_id))  # fmt: skip

    def finish(self, job_id: str, status: str, error: str | None = None, outputs: list[str] | None = None) -> None:
        assert status in FINISHED
        now = time.time()
        with self._connect() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, outputs = ?, finished = ?, eta = NULL, phase = '', "
                       "updated = ? WHERE id = ?",
                       (status, error, json.dumps(outputs or []), now, now, job_id))  # fmt: skip

    def request_cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, or ask a running one to stop; returns its status after, or None."""
        now = time.time()
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            status = row["status"]
            if status == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, updated = ? WHERE id = ?",
                           (now, now, job_id))  # fmt: skip
                status = "cancelled"
            elif status == "running":
                db.execute("UPDATE jobs SET cancel = 1, updated = ? WHERE id = ?", (now, job_id))
            db.execute("COMMIT")
        return status

    def cancelled(self, job_id: str) -> bool:
        with self._connect() as db:
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel"])

    def recover(self) -> int:
        """Put jobs left running by a killed server back in the queue (they resume from their checkpoint)."""
        with self._connect() as db:
            cursor = db.execute("UPDATE jobs SET status = CASE WHEN cancel THEN 'cancelled' ELSE 'queued' END, "
                                "updated = ? WHERE status = 'running'", (time.time(),))  # fmt: skip
            return cursor.rowcount

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}
