"""What a `gigadiff serve` instance is allowed to do: where it keeps its data, who may talk to it, its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gigadiff.errors import GigadiffError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "GIGADIFF_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    data: Path
    """Folder of the job database and of every job's files (data/jobs/<id>/)."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    """Required from clients (`Authorization: Bearer`, or the page's login cookie); mandatory off localhost."""
    models: Path | None = None
    """A folder of diffusers models clients may name (by folder name); besides it, presets and hub ids."""
    devices: tuple[str, ...] = ("auto",)
    """One worker process per device, each running jobs in order."""
    ray: str | None = None
    """The address of a Ray cluster to run jobs on instead (gigadiff.serve.ray_pool); `data` must then be a folder
    every node of it sees at the same path."""
    max_side: int = 16384
    max_steps: int = 200
    max_request_mb: float = 8.0
    """Largest job request (JSON, with any init image or mask as data URLs), in MiB."""
    max_processes: int = 8
    keep_models: int = 2
    """Models a worker keeps loaded between jobs (least recently used go first)."""
    checkpoint_every: int = 1
    """Every job checkpoints after this many steps, so that a restarted server resumes it."""
    max_attempts: int = 3
    """Runs a job may have (its worker died under it, or its server stopped) before it fails with that reason."""
    max_queued: int = 50
    """Jobs one client (by address) may have queued or running at once."""
    keep_days: float | None = None
    """Finished jobs and their files are deleted this many days after they ended (None: kept until deleted)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """A certificate and its key (PEM) to serve HTTPS with (uvicorn's); the login cookie is then Secure."""

    def __post_init__(self) -> None:
        if self.host not in LOCAL_HOSTS and not self.token:
            raise GigadiffError(
                f"serving on {self.host!r} (not this machine only) needs a token: give {{token}} or set {TOKEN_ENV}",
                "token",
            )
        if self.models is not None and not self.models.is_dir():
            raise GigadiffError(f"{{models}} {self.models} is not a folder", "models")
        if self.keep_days is not None and not self.keep_days > 0:
            raise GigadiffError(f"{{keep_days}} must be above 0, got {self.keep_days}", "keep_days")
        for name, value in (("max_side", self.max_side), ("max_steps", self.max_steps),
                            ("max_request_mb", self.max_request_mb), ("keep_models", self.keep_models),
                            ("max_queued", self.max_queued), ("max_attempts", self.max_attempts)):  # fmt: skip
            if value <= 0 if name == "max_request_mb" else value < 1:
                raise GigadiffError(f"{{{name}}} must be {'above 0' if name == 'max_request_mb' else 'at least 1'}, "
                                    f"got {value}", name)  # fmt: skip
        if not self.devices:
            raise GigadiffError("{devices} names no device (e.g. auto, or cuda:0,cuda:1)", "devices")
        from gigadiff.backends.device import DEVICES, check_device_name

        for device in self.devices:
            try:
                check_device_name(device)
            except GigadiffError:
                raise GigadiffError(f"unknown device {device!r} in {{devices}}; use {', '.join(DEVICES)} or cuda:N, "
                                    "comma-separated", "devices") from None  # fmt: skip
        if (self.tls_cert is None) != (self.tls_key is None):
            raise GigadiffError("HTTPS needs both {tls_cert} and {tls_key}", "tls_cert", "tls_key")
        for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if path is not None and not path.is_file():
                raise GigadiffError(f"{{{name}}} {path} is not a file", name)
        if not 0 <= self.port <= 65535:
            raise GigadiffError(f"{{port}} must be 0..65535, got {self.port}", "port")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def jobs(self) -> Path:
        return self.data / "jobs"

    @property
    def database(self) -> Path:
        return self.data / "jobs.db"

    @staticmethod
    def token_from_env(token: str | None) -> str | None:
        return token or os.environ.get(TOKEN_ENV) or None
