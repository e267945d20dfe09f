"""A small Python client of `gigadiff serve` (standard library only): queue jobs, follow them, fetch outputs.

client = Client("http://127.0.0.1:8000", token=None)
job = client.submit({"prompt": "a harbour town at dusk", "model": "sdxl", "size": "4096x2048"})
for kind, data in client.events(job):  # progress, preview, end
    ...
client.download(job, "harbour.tif")
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

FINISHED = ("done", "failed", "cancelled")


def server_sent_events(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, data) of each event in a server-sent event stream's lines, up to and including `end`."""
    kind, data = "message", []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield kind, json.loads("\n".join(data))
            if kind == "end":
                return
            kind, data = "message", []


class ApiError(RuntimeError):
    """The server refused a request: its status code and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class Client:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of a request; an HTTP error status raises ApiError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                text = json.loads(text)["error"]
            raise ApiError(e.code, text) from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self.request(method, path, body)[1])

    def submit(self, request: dict[str, Any]) -> str:
        return self.json("POST", "/api/jobs", request)["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.json("GET", f"/api/jobs/{job_id}")

    def jobs(self) -> list[dict[str, Any]]:
        return self.json("GET", "/api/jobs")["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.json("DELETE", f"/api/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, until: tuple[str, ...] = FINISHED,
             poll: float = 0.2) -> dict[str, Any]:  # fmt: skip
        """Poll until the job's status is in `until` (TimeoutError after `timeout` s)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s (step {job['step']})")
            time.sleep(poll)

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events, (kind, data), until its end."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(f"{self.url}/api/jobs/{job_id}/events", headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as response:
            yield from server_sent_events(raw.decode() for raw in response)

    def download(self, job_id: str, path: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
        """Save the job's image (or its output `name`) to `path` (an existing file only with `overwrite`)."""
        route = f"/api/jobs/{job_id}/image" if name is None else f"/api/jobs/{job_id}/files/{name}"
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        path.write_bytes(self.request("GET", route)[1])
        return path
