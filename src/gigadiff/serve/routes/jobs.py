"""The job resource: queue a job, list and read jobs, cancel one, follow it (server-sent events), its files."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from gigadiff.errors import GigadiffError
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.jobs import message, validate
from gigadiff.serve.log import LOG, describe
from gigadiff.serve.routes.common import ApiError, error, job_or_404, output_path, parse_json, public, read_bounded
from gigadiff.serve.store import FINISHED, JobStore

EVENT_POLL_S = 0.25
HEARTBEAT_S = 15.0
EVENT_PREVIEW_SIDE = 256


def jobs_router(config: ServeConfig, store: JobStore) -> APIRouter:
    router = APIRouter()

    @router.post("/api/jobs", status_code=201, summary="Queue a job (generate's options, underscores for dashes)")
    async def submit(request: Request) -> JSONResponse:
        body = await read_bounded(request, config.max_request_bytes)
        if body is None:
            return error(413, f"request too large: this server takes at most {config.max_request_bytes} bytes")
        try:
            data = parse_json(body)
        except ValueError as e:
            return error(400, f"the request is not valid JSON: {e}")
        try:
            data = await run_in_threadpool(validate, data, config)
        except GigadiffError as e:
            LOG.info("job refused: %s", message(e))
            return error(400, message(e))
        client = request.client.host if request.client else None
        job = await run_in_threadpool(store.submit, data, client, config.max_queued)
        if job is None:
            LOG.info("job refused: %s has %d jobs waiting or running", client, config.max_queued)
            return error(429, f"this client has {config.max_queued} jobs waiting or running, this server's limit: "
                              "submit more when some have finished")  # fmt: skip
        LOG.info("job %s queued: %s", job.id, describe(data))
        return JSONResponse({"id": job.id, "status": job.status, "seed": data["seed"]}, status_code=201)

    @router.get("/api/jobs", summary="Jobs, newest first, and how many are in each status")
    def jobs(limit: int = 200) -> dict[str, Any]:
        listed = store.recent(max(1, min(limit, 1000)))
        return {"jobs": [public(config, j) for j in listed], "counts": store.counts()}

    @router.get("/api/jobs/{job_id}", summary="A job's status, progress, error and outputs")
    def job(job_id: str) -> dict[str, Any]:
        return public(config, job_or_404(store, job_id))

    @router.delete(
        "/api/jobs/{job_id}",
        summary="Cancel a queued or running job (it leaves no output); delete a finished one and its files",
    )
    def cancel(job_id: str) -> JSONResponse:
        job = job_or_404(store, job_id)
        if job.status in FINISHED:  # a finished job: forgotten, with its files
            if store.delete(job_id, config.jobs / job_id):
                LOG.info("job %s deleted", job_id)
            return JSONResponse({"id": job_id, "status": "deleted"})
        status = store.request_cancel(job_id)
        LOG.info("job %s: cancel asked (%s)", job_id, "cancelled" if status == "cancelled" else "stopping it")
        return JSONResponse({"id": job_id, "status": status, "cancel": status == "running"})

    @router.get("/api/jobs/{job_id}/events", summary="Server-sent events: progress, a preview per step, the end")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        await run_in_threadpool(job_or_404, store, job_id)
        return StreamingResponse(_events(config, store, job_id, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip

    @router.get("/api/jobs/{job_id}/preview", summary="The latest preview of a running job (PNG)")
    def preview(job_id: str) -> FileResponse:
        path = config.jobs / job_or_404(store, job_id).id / "preview.png"
        if not path.is_file():
            raise ApiError(404, f"job {job_id} has no preview yet")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})

    @router.get("/api/jobs/{job_id}/image", summary="The full output image (BigTIFF pyramid, or the heightmap)")
    def image(job_id: str) -> FileResponse:
        path = output_path(config, store, job_id)
        return FileResponse(path, filename=f"gigadiff-{job_id[:8]}{path.suffix}")

    @router.get("/api/jobs/{job_id}/files/{name}", summary="Any other output of a job, by the name it lists")
    def file(job_id: str, name: str) -> FileResponse:
        return FileResponse(output_path(config, store, job_id, name))

    return router


async def _events(config: ServeConfig, store: JobStore, job_id: str, request: Request) -> Any:
    """The job's state now, then every change the store recorded after it, in order (none is skipped however
    quickly they follow each other), a preview when the preview file changes, and `end` when it finishes."""
    job, seq = await run_in_threadpool(store.watch, job_id)
    if job is None:
        return
    yield _event("progress", public(config, job))
    preview_mtime, idle = None, 0.0
    preview = config.jobs / job_id / "preview.png"
    while job.status not in FINISHED and not await request.is_disconnected():
        changes = await run_in_threadpool(store.events, job, seq)
        for number, state in changes:
            seq, job, idle = number, state, 0.0
            yield _event("progress", public(config, job))
        mtime = preview.stat().st_mtime_ns if preview.is_file() else None
        if mtime is not None and mtime != preview_mtime:
            preview_mtime = mtime
            image = await run_in_threadpool(_preview_url, preview)
            if image:
                yield _event("preview", {"id": job_id, "step": job.step, "image": image})
        if job.status in FINISHED:
            break
        await asyncio.sleep(EVENT_POLL_S)
        idle += EVENT_POLL_S
        if idle >= HEARTBEAT_S:
            idle = 0.0
            yield ": keep-alive\n\n"
    if job.status in FINISHED:
        yield _event("end", public(config, job))


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
