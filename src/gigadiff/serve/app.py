"""The service's HTTP face (FastAPI): the job API, server-sent progress, Deep Zoom tiles and the web page.

The API process never imports torch: it checks a job as the command line would (gigadiff.serve.jobs) and queues
it in the job store; worker processes (gigadiff.serve.worker) run it. Every route but the login page needs the
token when one is set: `Authorization: Bearer <token>`, or the cookie the login page sets. Clients name jobs by
id and files by the names the server gave them; any other name is a 404, so no path reaches outside a job's
folder.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import re
import secrets
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from gigadiff import __version__
from gigadiff.errors import GigadiffError
from gigadiff.serve import deepzoom
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.jobs import local_models, message, validate, view_name
from gigadiff.serve.store import FINISHED, Job, JobStore

COOKIE = "gigadiff_token"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
TILE_NAME = re.compile(r"^(\d{1,6})_(\d{1,6})\.(jpeg|png)$")
EVENT_POLL_S = 0.25
HEARTBEAT_S = 15.0
EVENT_PREVIEW_SIDE = 256
WEB = Path(__file__).parent / "web"
VIEWER = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"
VIEWER_SETUP = "npm --prefix src/gigadiff/serve/web ci"
OPEN_PATHS = ("/login", "/static/login.css")


class ApiError(Exception):
    def __init__(self, status: int, error: str):
        self.status, self.error = status, error


def _error(status: int, error: str) -> JSONResponse:
    return JSONResponse({"error": error}, status_code=status)


def _elide(value: Any) -> Any:
    """A request as the API shows it: images given as data URLs shortened to their size."""
    if isinstance(value, str) and value.startswith("data:"):
        return f"{value[: value.find(',') + 1]}... ({len(value)} characters)"
    if isinstance(value, dict):
        return {k: _elide(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_elide(v) for v in value]
    return value


def viewer_installed() -> bool:
    return (VIEWER / "openseadragon.min.js").is_file()


@functools.lru_cache(maxsize=64)
def _pyramid(path: str, mtime_ns: int) -> deepzoom.Pyramid:
    return deepzoom.open_pyramid(Path(path))


def create_app(config: ServeConfig) -> FastAPI:
    """The service for `config` (its data folder and job database are created if new)."""
    config.jobs.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.database)
    app = FastAPI(title="gigadiff", version=__version__,
                  description="Queue gigadiff runs, follow them, and view their outputs in Deep Zoom.")  # fmt: skip
    app.state.store, app.state.config = store, config

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.error)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_request_bytes):
            return _error(413, f"request too large: this server takes at most {config.max_request_bytes} bytes")
        if config.token and request.url.path not in OPEN_PATHS and not _authorized(request, config.token):
            if request.url.path.startswith("/api/"):
                return _error(401, "this server needs its token: send 'Authorization: Bearer <token>'")
            if request.url.path in ("/", "/index.html"):
                return RedirectResponse("/login", status_code=303)
            return _error(401, "log in first (/login)")
        return await call_next(request)

    def job_or_404(job_id: str) -> Job:
        job = store.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        return job

    def public(job: Job) -> dict[str, Any]:
        out = job.public()
        out["request"] = _elide(out["request"])
        folder = config.jobs / job.id
        if job.status == "done" and (folder / view_name(job.outputs)).is_file():
            out["dzi"] = f"/api/jobs/{job.id}/image.dzi"
        return out

    @app.post("/api/jobs", status_code=201, summary="Queue a job (generate's options, underscores for dashes)")
    async def submit(request: Request) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_request_bytes:
                return _error(413, f"request too large: this server takes at most {config.max_request_bytes} bytes")
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request is not valid JSON: {e}")
        try:
            data = await run_in_threadpool(validate, data, config)
        except GigadiffError as e:
            return _error(400, message(e))
        job = await run_in_threadpool(store.submit, data)
        return JSONResponse({"id": job.id, "status": job.status, "seed": data["seed"]}, status_code=201)

    @app.get("/api/jobs", summary="Jobs, newest first, and how many are in each status")
    def jobs(limit: int = 200) -> dict[str, Any]:
        return {"jobs": [public(j) for j in store.list(max(1, min(limit, 1000)))], "counts": store.counts()}

    @app.get("/api/jobs/{job_id}", summary="A job's status, progress, error and outputs")
    def job(job_id: str) -> dict[str, Any]:
        return public(job_or_404(job_id))

    @app.delete("/api/jobs/{job_id}", summary="Cancel a queued or running job (it leaves no output)")
    def cancel(job_id: str) -> JSONResponse:
        job = job_or_404(job_id)
        if job.status in FINISHED:
            return _error(409, f"job {job_id} is already {job.status}")
        status = store.request_cancel(job_id)
        return JSONResponse({"id": job_id, "status": status, "cancel": status == "running"})

    @app.get("/api/jobs/{job_id}/events", summary="Server-sent events: progress, a preview per step, the end")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        await run_in_threadpool(job_or_404, job_id)
        return StreamingResponse(_events(job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    async def _events(job_id: str, request: Request) -> Any:
        updated, preview_mtime, idle = None, None, 0.0
        preview = config.jobs / job_id / "preview.png"
        while not await request.is_disconnected():
            job = await run_in_threadpool(store.get, job_id)
            if job is None:
                return
            if job.updated != updated:
                updated, idle = job.updated, 0.0
                yield _event("progress", public(job))
            mtime = preview.stat().st_mtime_ns if preview.is_file() else None
            if mtime is not None and mtime != preview_mtime:
                preview_mtime = mtime
                image = await run_in_threadpool(_preview_url, preview)
                if image:
                    yield _event("preview", {"id": job_id, "step": job.step, "image": image})
            if job.status in FINISHED:
                yield _event("end", public(job))
                return
            await asyncio.sleep(EVENT_POLL_S)
            idle += EVENT_POLL_S
            if idle >= HEARTBEAT_S:
                idle = 0.0
                yield ": keep-alive\n\n"

    @app.get("/api/jobs/{job_id}/preview", summary="The latest preview of a running job (PNG)")
    def preview(job_id: str) -> FileResponse:
        path = config.jobs / job_or_404(job_id).id / "preview.png"
        if not path.is_file():
            raise ApiError(404, f"job {job_id} has no preview yet")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

    def output(job_id: str, name: str | None = None) -> Path:
        job = job_or_404(job_id)
        if job.status != "done":
            raise ApiError(404, f"job {job_id} is {job.status}: its outputs come when it is done")
        if name is None:
            name = job.outputs[0] if job.outputs else ""
        if name not in job.outputs:
            raise ApiError(404, f"job {job_id} has no output {name!r} (outputs: {', '.join(job.outputs)})")
        return config.jobs / job.id / name

    @app.get("/api/jobs/{job_id}/image", summary="The full output image (BigTIFF pyramid, or the heightmap)")
    def image(job_id: str) -> FileResponse:
        path = output(job_id)
        return FileResponse(path, filename=f"gigadiff-{job_id[:8]}{path.suffix}")

    @app.get("/api/jobs/{job_id}/files/{name}", summary="Any other output of a job, by the name it lists")
    def file(job_id: str, name: str) -> FileResponse:
        return FileResponse(output(job_id, name))

    def pyramid(job_id: str) -> deepzoom.Pyramid:
        job = job_or_404(job_id)
        path = output(job_id, view_name(job.outputs))
        try:
            return _pyramid(str(path), path.stat().st_mtime_ns)
        except (OSError, ValueError) as e:
            raise ApiError(404, f"job {job_id} has no image pyramid: {e}") from None

    @app.get("/api/jobs/{job_id}/image.dzi", summary="The Deep Zoom descriptor of a job's image")
    def dzi(job_id: str, format: str = "jpeg") -> Response:
        if format not in deepzoom.FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(deepzoom.FORMATS)}")
        return Response(pyramid(job_id).dzi(format), media_type="application/xml")

    @app.get("/api/jobs/{job_id}/image_files/{level}/{name}", summary="One Deep Zoom tile: {col}_{row}.jpeg|png")
    def dzi_tile(job_id: str, level: str, name: str) -> Response:
        match = TILE_NAME.match(name)
        if not level.isdigit() or match is None:
            raise ApiError(404, f"no tile {level}/{name}")
        col, row, fmt = int(match[1]), int(match[2]), match[3]
        try:
            data = deepzoom.tile_bytes(pyramid(job_id), int(level), col, row, fmt)
        except deepzoom.NoTile as e:
            raise ApiError(404, str(e)) from None
        return Response(data, media_type=deepzoom.MEDIA_TYPES[fmt], headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/models", summary="The models a job may name")
    def models() -> dict[str, Any]:
        from gigadiff.backends.registry import builtin_names, presets

        return {"presets": sorted(presets()), "builtin": list(builtin_names()), "local": local_models(config),
                "hub": "any hub id owner/name this server can reach or has cached"}  # fmt: skip

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    @app.get("/login", include_in_schema=False)
    def login_page() -> HTMLResponse:
        return HTMLResponse((WEB / "login.html").read_text())

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        from urllib.parse import parse_qs

        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        if not config.token or not secrets.compare_digest(token.encode(), config.token.encode()):
            return RedirectResponse("/login?wrong=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    if viewer_installed():
        app.mount("/vendor/openseadragon", StaticFiles(directory=VIEWER), name="openseadragon")
    return app


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
    return secrets.compare_digest(given.encode(), token.encode())


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def _preview_url(path: Path) -> str | None:
    """The preview as a small JPEG data URL (None if it was being replaced)."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except OSError:
        return None
    image.thumbnail((EVENT_PREVIEW_SIDE, EVENT_PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
