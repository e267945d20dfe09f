"""The web page: the queue and viewer page, its login, and the static files (the viewer comes from npm)."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from gigadiff.serve.config import ServeConfig

COOKIE = "gigadiff_token"
WEB = Path(__file__).parent.parent / "web"
VIEWER = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"
VIEWER_SETUP = "npm --prefix src/gigadiff/serve/web ci"


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

    @router.post("/login")
    async def login(request: Request) -> Response:
        from urllib.parse import parse_qs

        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0]
        if not config.token or not secrets.compare_digest(token.encode(), config.token.encode()):
            return RedirectResponse("/login?wrong=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return router
