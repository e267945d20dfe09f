"""What every request must pass before a route sees it: its size, its Host, its Origin, its content type and the
token; and the headers every answer carries.

Decisions read the ASGI scope (its path and raw headers), never a URL rebuilt from the Host header: Starlette
before 1.0.1 rebuilt `request.url` from Host, so `Host: 127.0.0.1:8792/login?` made `GET /api/jobs` look like the
open `/login` to a guard that read `request.url.path`.

A server on a loopback address answers only requests whose Host is a loopback name: a web page whose name an
attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused. A request that
changes state (any method but GET, HEAD and OPTIONS) from a browser carries an Origin, which must be this
server's own; and a job must be sent as `application/json`, a content type a cross-origin page cannot send
without the browser asking first (a preflight this server never grants). Clients that are not browsers (the
Python client, curl) send no Origin and pass.

A client address whose requests keep failing (malformed, refused, unauthorised: `THROTTLED`) is answered 429
at once, before its body is read, until its failures leave the window: a hostile client looping over expensive
bad requests then costs the server almost nothing, and the honest clients' answers stay quick. The unit is the
address, as for the login's limit and the queue's per-client limit (behind a reverse proxy every client shares
the proxy's).
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from gigadiff.serve.config import LOCAL_HOSTS, ServeConfig

COOKIE = "gigadiff_token"
OPEN_PATHS = ("/login", "/static/login.css", "/static/login.js")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
JSON_PATHS = ("/api/jobs",)
"""Routes whose POST body is a JSON document."""

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # not no-referrer: under it a browser sends `Origin: null` with its forms
}
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
               "form-action 'self'")  # fmt: skip
"""The Content-Security-Policy of every answer but the API documentation's (whose pages load their scripts
from a CDN): the page runs only this server's scripts, and no other site may frame it."""
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")

BAD_REQUESTS, BAD_REQUESTS_WINDOW_S = 30, 10.0
"""A client address with this many failed requests within the window is answered 429 until the oldest leaves."""
THROTTLED = frozenset({400, 401, 403, 405, 411, 413, 415, 421, 422, 431})
"""The answers that count as a client's failure (a 404 does not: a page may ask for what is not there yet)."""


class RecentFailures:
    """Failures per client address within a sliding window: an address with `limit` of them within `window_s`
    waits until the oldest leaves the window. At most KEEP addresses are remembered (the oldest forgotten first),
    so that many addresses cannot grow it without bound."""

    KEEP = 10000

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        times = self.failures.get(client, deque())
        while times and times[0] <= self.clock() - self.window_s:
            times.popleft()
        return times

    def wait(self, client: str) -> float:
        """Seconds until `client` may be answered again (0: now)."""
        times = self._recent(client)
        if len(times) < self.limit:
            return 0.0
        return times[len(times) - self.limit] + self.window_s - self.clock()

    def failed(self, client: str) -> None:
        if client not in self.failures and len(self.failures) >= self.KEEP:
            self.failures.pop(next(iter(self.failures)))
        times = self._recent(client)
        times.append(self.clock())
        self.failures[client] = times


def throttled(wait_s: float) -> tuple[int, str, dict[str, str]]:
    """The 429 of a client that waits `wait_s` seconds: status, message and its Retry-After."""
    seconds = max(1, math.ceil(wait_s))
    return 429, f"too many failed requests from this address: retry in {seconds} s", {"Retry-After": str(seconds)}


def headers_of(scope: Mapping) -> dict[str, str]:
    """The request's headers, lower-case names (the last value of a repeated header)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def host_name(host: str) -> str:
    """The name part of a Host header value ("[::1]:8000" -> "[::1]", "localhost:80" -> "localhost")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, config: ServeConfig) -> bool:
    """A loopback server answers loopback names only; a server listening elsewhere (always with a token) any."""
    return config.host not in LOCAL_HOSTS or host_name(host) in LOOPBACK_NAMES


def origin_allowed(origin: str | None, host: str) -> bool:
    """No Origin (not a browser), or this server's own (same host and port as the request's Host)."""
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == host.strip().lower() != ""


def token_given(headers: Mapping[str, str]) -> str:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:]
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header is no token
        return ""
    return cookie[COOKIE].value if COOKIE in cookie else ""


def authorized(headers: Mapping[str, str], token: str) -> bool:
    return secrets.compare_digest(token_given(headers).encode(), token.encode())


def refusal(scope: Mapping, config: ServeConfig) -> tuple[int, str] | None:
    """Why this request is refused before any route runs (status, message), or None."""
    path, method, headers = scope.get("path", ""), scope.get("method", "GET"), headers_of(scope)
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > config.max_request_bytes):
        return 413, f"request too large: this server takes at most {config.max_request_bytes} bytes"
    host = headers.get("host", "")
    if not host_allowed(host, config):
        return 421, f"this server answers to {', '.join(LOOPBACK_NAMES)} only, not to {host_name(host)!r}"
    if method not in SAFE_METHODS:
        if not origin_allowed(headers.get("origin"), host):
            return 403, "cross-origin requests are refused: send it from this server's own page"
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and path in JSON_PATHS and content_type != "application/json":
            return 415, "send the job as JSON (Content-Type: application/json)"
    if config.token and path not in OPEN_PATHS and not authorized(headers, config.token):
        if path.startswith("/api/"):
            return 401, "this server needs its token: send 'Authorization: Bearer <token>'"
        return 401, "log in first (/login)"
    return None


def answer_headers(path: str) -> dict[str, str]:
    """The headers added to every answer."""
    if path in DOCS_PATHS:
        return {**SECURITY_HEADERS, "Content-Security-Policy": "frame-ancestors 'none'"}
    return {**SECURITY_HEADERS, "Content-Security-Policy": PAGE_POLICY}
