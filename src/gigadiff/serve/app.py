"""The service's HTTP face (FastAPI): routers per resource (gigadiff.serve.routes: jobs, images, the page) behind
one guard.

The API process never imports torch: it checks a job as the command line would (gigadiff.serve.jobs) and queues
it in the job store; worker processes (gigadiff.serve.worker) run it. Every route but the login page needs the
token when one is set: `Authorization: Bearer <token>`, or the cookie the login page sets. Clients name jobs by
id and files by the names the server gave them; any other name is a 404, so no path reaches outside a job's
folder.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from gigadiff import __version__
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.routes.common import ApiError, error
from gigadiff.serve.routes.images import images_router
from gigadiff.serve.routes.jobs import jobs_router
from gigadiff.serve.routes.page import COOKIE, VIEWER, VIEWER_SETUP, WEB, page_router, viewer_installed
from gigadiff.serve.store import JobStore

OPEN_PATHS = ("/login", "/static/login.css")

__all__ = ["VIEWER_SETUP", "create_app", "viewer_installed"]


def create_app(config: ServeConfig) -> FastAPI:
    """The service for `config` (its data folder and job database are created if new)."""
    config.jobs.mkdir(parents=True, exist_ok=True)
    store = JobStore(config.database)
    app = FastAPI(title="gigadiff", version=__version__,
                  description="Queue gigadiff runs, follow them, and view their outputs in Deep Zoom.")  # fmt: skip
    app.state.store, app.state.config = store, config

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(e.status, e.error)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_request_bytes):
            return error(413, f"request too large: this server takes at most {config.max_request_bytes} bytes")
        if config.token and request.url.path not in OPEN_PATHS and not _authorized(request, config.token):
            if request.url.path.startswith("/api/"):
                return error(401, "this server needs its token: send 'Authorization: Bearer <token>'")
            if request.url.path in ("/", "/index.html"):
                return RedirectResponse("/login", status_code=303)
            return error(401, "log in first (/login)")
        return await call_next(request)

    app.include_router(jobs_router(config, store))
    app.include_router(images_router(config, store))
    app.include_router(page_router(config))
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    if viewer_installed():
        app.mount("/vendor/openseadragon", StaticFiles(directory=VIEWER), name="openseadragon")
    return app


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
    return secrets.compare_digest(given.encode(), token.encode())
