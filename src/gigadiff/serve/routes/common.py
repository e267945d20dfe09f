"""What every route of the service shares: its errors as JSON, a job looked up by id, a job as the API shows it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fastapi import Request
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


MAX_JSON_DEPTH = 32
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parse_json(body: bytes) -> Any:
    """A client's JSON document, refused (ValueError, with the reason) unless it is strict JSON a job can hold:
    UTF-8, no NaN or infinite numbers (which the API could not answer in JSON), no lone surrogates (which no
    UTF-8 answer can carry: one in a stored prompt would break every later listing), nesting at most
    MAX_JSON_DEPTH deep, integers of at most 4300 digits (Python's own limit). The checks cost little beside
    the parse itself (a hostile client may send megabytes of valid JSON): numbers are checked as they are
    parsed, strings only when the text holds a surrogate escape, and the depth walk visits containers only."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"it is not UTF-8 ({e.reason} at byte {e.start})") from None

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise ValueError(f"{literal[:20]} is not a finite number")
        return value

    try:
        data = json.loads(text or "null", parse_constant=constant, parse_float=number)
    except RecursionError:
        raise ValueError(f"it is nested more than {MAX_JSON_DEPTH} deep") from None
    _check_depth(data)
    if _SURROGATE_ESCAPE.search(text):
        _check_text(data)
    return data


def _check_depth(value: Any) -> None:
    """Level by level, containers only (a megabyte of regions is 20000 small dicts: this stays a small part of
    the parse's cost)."""
    level, depth = [value] if isinstance(value, dict | list) else [], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"it is nested more than {MAX_JSON_DEPTH} deep")
        level = [child for item in level for child in (item.values() if type(item) is dict else item)
                 if type(child) is dict or type(child) is list]  # fmt: skip


def _check_text(value: Any) -> None:
    """Every string (and key) encodes to UTF-8: a lone surrogate does not."""
    strings = [value]
    while strings:
        item = strings.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
        elif isinstance(item, dict):
            strings.extend(item.keys())
            strings.extend(item.values())
        elif isinstance(item, list):
            strings.extend(item)


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The request's body, or None once it passes `limit` bytes (read chunk by chunk: a chunked body has no
    Content-Length for the guard to check)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


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
