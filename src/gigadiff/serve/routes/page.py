"""The web page: the queue and viewer page, its login, and the static files (the viewer comes from npm)."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gigadiff.serve.config import ServeConfig
from gigadiff.serve.guard import COOKIE, RecentFailures
from gigadiff.serve.routes.common import error, read_bounded

WEB = Path(__file__).parent.parent / "web"
VIEWER = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"
VIEWER_SETUP = "npm --prefix src/gigadiff/serve/web ci"


LOGIN_BODY_BYTES = 4096
COOKIE_MAX_AGE_S = 7 * 24 * 3600
LOGIN_FAILURES, LOGIN_WINDOW_S = 5, 60.0
"""A client address with this many wrong tokens within the window waits until the oldest leaves it."""


def viewer_installed() -> bool:
    return (VIEWER / "openseadragon.min.js").is_file()


def page_router(config: ServeConfig) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text())

    @router.get("/login")
    def login_page() -> HTMLResponse:
        return HTMLResponse((WEB / "login.html").read_text())

    attempts = RecentFailures(LOGIN_FAILURES, LOGIN_WINDOW_S)

    @router.post("/login")
    async def login(request: Request) -> Response:
        from urllib.parse import parse_qs

        client = request.client.host if request.client else "?"
        if attempts.wait(client) > 0:
            return RedirectResponse("/login?wait=1", status_code=303)
        body = await read_bounded(request, LOGIN_BODY_BYTES)
        if body is None:
            return error(413, f"a login is at most {LOGIN_BODY_BYTES} bytes")
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        if not config.token or not secrets.compare_digest(token.encode(), config.token.encode()):
            attempts.failed(client)
            return RedirectResponse("/login?wrong=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="strict",
                            secure=config.tls)  # fmt: skip
        return response

    @router.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict", secure=config.tls)
        return response

    return router
