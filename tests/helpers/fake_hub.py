"""A Hugging Face hub on localhost, for tests of what gigadiff does with hub models without the real hub.

It serves folders saved with `save_pretrained` under repo ids, answering the requests `huggingface_hub` makes
(file metadata by HEAD, files by GET under `/{repo}/resolve/{revision}/{path}`, a repo's description and file
list under `/api/models/{repo}` and `/api/models/{repo}/tree/{revision}`), and records every request so that a
test can assert that none was made. A repo can be marked gated: it then answers 401 with the hub's `GatedRepo`
error code, as the real hub does without a login.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    repos: dict[str, Path]
    gated: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def file(self, repo: str, path: str) -> Path | None:
        root = self.repos.get(repo)
        if root is None:
            return None
        candidate = (root / path).resolve()
        return candidate if candidate.is_file() and candidate.is_relative_to(root.resolve()) else None


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                if len(parts) >= 6 and parts[4] == "tree":
                    return self._tree("/".join(parts[2:4]), "/".join(parts[6:]))
                return self._model_info("/".join(parts[2:4]))
            if len(parts) < 5 or parts[2] != "resolve":
                return self._reply(404, headers={"X-Error-Code": "RepoNotFound"})
            repo, relative = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in hub.repos:
                return self._reply(401, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "no such repo"})
            if repo in hub.gated:
                return self._reply(401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "gated repo"})
            found = hub.file(repo, relative)
            if found is None:
                return self._reply(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            data = found.read_bytes()
            etag = (
                hashlib.sha256(data).hexdigest() if found.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
            )
            self._reply(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})

        def _model_info(self, repo: str) -> None:
            root = hub.repos.get(repo)
            if root is None:
                return self._reply(401, headers={"X-Error-Code": "RepoNotFound"})
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            body = json.dumps({"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}).encode()
            self._reply(200, body, {"Content-Type": "application/json", "X-Repo-Commit": COMMIT})

        def _tree(self, repo: str, under: str) -> None:
            root = hub.repos.get(repo)
            if root is None:
                return self._reply(401, headers={"X-Error-Code": "RepoNotFound"})
            entries = [{"type": "file", "path": str(p.relative_to(root)), "size": p.stat().st_size,
                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                       for p in sorted((root / under).rglob("*")) if p.is_file()]  # fmt: skip
            self._reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

        do_GET = _serve
        do_HEAD = _serve

    return Handler


def refusing_endpoint() -> str:
    """A hub endpoint on a local port nothing listens on (bound, then released): connections are refused at once,
    as on a machine without network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def fake_hub(repos: dict[str, Path], gated: set[str] | None = None) -> Iterator[FakeHub]:
    """A running fake hub (its `url` is the HF_ENDPOINT to give a process), stopped on exit."""
    hub = FakeHub(dict(repos), set(gated or ()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
