"""What every route of the service shares: its errors as JSON, a job looked up by id, a job as the API shows it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from gigadiff.serve.config import ServeConfig
from gigadiff.serve.jobs import view_name
from gigadiff.serve.store import Job, JobStore

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class ApiError(Exception):
    """An error a route answers with: its status and `{"error": message}`."""

    def __init__(self, status: int, error: str):
        self.status, self.error = status, error


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def elide(value: Any) -> Any:
    """A request as the API shows it: images given as data URLs shortened to their size."""
    if isinstance(value, str) and value.startswith("data:"):
        return f"{value[: value.find(',') + 1]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: elide(v) for k, v in value.items()}
    if isinstance(value, list):
        return [elide(v) for v in value]
    return value


def job_or_404(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {job_id!r}")
    return job


def public(config: ServeConfig, job: Job) -> dict[str, Any]:
    """A job as the API shows it: its record, its request elided, the address of its Deep Zoom view when done."""
    out = job.public()
    out["request"] = elide(out["request"])
    if job.status == "done" and (config.jobs / job.id / view_name(job.outputs)).is_file():
        out["dzi"] = f"/api/jobs/{job.id}/image.dzi"
    return out


def output_path(config: ServeConfig, store: JobStore, job_id: str, name: str | None = None) -> Path:
    """A finished job's output by the name the job lists (its image by default); any other name is a 404."""
    job = job_or_404(store, job_id)
    if job.status != "done":
        raise ApiError(404, f"job {job_id} is {job.status}: its outputs come when it is done")
    if name is None:
        name = job.outputs[0] if job.outputs else ""
    if name not in job.outputs:
        raise ApiError(404, f"job {job_id} has no output {name!r} (outputs: {', '.join(job.outputs)})")
    return config.jobs / job.id / name
