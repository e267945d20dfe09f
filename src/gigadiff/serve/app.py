"""The service's HTTP face (FastAPI): routers per resource (gigadiff.serve.routes: jobs, images, the page) behind
one guard.

The API process never imports torch: it checks a job as the command line would (gigadiff.serve.jobs) and queues
it in the job store; worker processes (gigadiff.serve.worker) run it. Every route but the login page needs the
token when one is set: `Authorization: Bearer <token>`, or the cookie the login page sets. Clients name jobs by
id and files by the names the server gave them; any other name is a 404, so no path reaches outside a job's
folder.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from gigadiff import __version__
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.guard import (
    BAD_REQUESTS,
    BAD_REQUESTS_WINDOW_S,
    THROTTLED,
    RecentFailures,
    answer_headers,
    refusal,
    throttled,
)
from gigadiff.serve.routes.common import ApiError, error
from gigadiff.serve.routes.images import images_router
from gigadiff.serve.routes.jobs import jobs_router
from gigadiff.serve.routes.page import VIEWER, VIEWER_SETUP, WEB, page_router, viewer_installed
from gigadiff.serve.store import JobStore

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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405: {"error"} too
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in x.get('loc', ()))}: {x.get('msg', '')}" for x in e.errors())
        return error(400, f"invalid request ({where})")

    failing = RecentFailures(BAD_REQUESTS, BAD_REQUESTS_WINDOW_S)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        path = request.scope.get("path", "")  # never request.url: older Starlette rebuilt it from Host
        client = request.client.host if request.client else "?"
        wait = failing.wait(client)
        response: Response
        if wait > 0:  # answered before anything of the request is read
            status, message, headers = throttled(wait)
            response = error(status, message)
            response.headers.update({**headers, **answer_headers(path)})
            return response
        refused = refusal(request.scope, config)
        if refused is None:
            response = await call_next(request)
        elif refused[0] == 401 and path in ("/", "/index.html"):
            response = RedirectResponse("/login", status_code=303)
        else:
            response = error(*refused)
        if response.status_code in THROTTLED:
            failing.failed(client)
        response.headers.update(answer_headers(path))
        return response

    app.include_router(jobs_router(config, store))
    app.include_router(images_router(config, store))
    app.include_router(page_router(config))
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")
    if viewer_installed():
        app.mount("/vendor/openseadragon", StaticFiles(directory=VIEWER), name="openseadragon")
    return app
