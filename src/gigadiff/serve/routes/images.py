"""The image resource: a finished job's Deep Zoom descriptor and tiles, cut from its BigTIFF pyramid, and the models a
job may name."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from gigadiff.serve import deepzoom
from gigadiff.serve.config import ServeConfig
from gigadiff.serve.jobs import local_models, view_name
from gigadiff.serve.routes.common import ApiError, job_or_404, output_path
from gigadiff.serve.store import JobStore

TILE_NAME = re.compile(r"^(\d{1,6})_(\d{1,6})\.(jpeg|png)$")


@functools.lru_cache(maxsize=64)
def _pyramid(path: str, mtime_ns: int) -> deepzoom.Pyramid:
    return deepzoom.open_pyramid(Path(path))


def images_router(config: ServeConfig, store: JobStore) -> APIRouter:
    router = APIRouter()

    def pyramid(job_id: str) -> deepzoom.Pyramid:
        job = job_or_404(store, job_id)
        path = output_path(config, store, job_id, view_name(job.outputs))
        try:
            return _pyramid(str(path), path.stat().st_mtime_ns)
        except (OSError, ValueError) as e:
            raise ApiError(404, f"job {job_id} has no image pyramid: {e}") from None

    @router.get("/api/jobs/{job_id}/image.dzi", summary="The Deep Zoom descriptor of a job's image")
    def dzi(job_id: str, format: str = "jpeg") -> Response:
        if format not in deepzoom.FORMATS:
            raise ApiError(400, f"format must be one of {', '.join(deepzoom.FORMATS)}")
        return Response(pyramid(job_id).dzi(format), media_type="application/xml")

    @router.get("/api/jobs/{job_id}/image_files/{level}/{name}", summary="One Deep Zoom tile: {col}_{row}.jpeg|png")
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

    @router.get("/api/models", summary="The models a job may name")
    def models() -> dict[str, Any]:
        from gigadiff.backends.registry import builtin_names, presets

        return {"presets": sorted(presets()), "builtin": list(builtin_names()), "local": local_models(config),
                "hub": "any hub id owner/name this server can reach or has cached"}  # fmt: skip

    return router
