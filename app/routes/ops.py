"""Operations: liveness, readiness (Redis and a live worker) and Prometheus metrics."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spkd.app.deps import (
    Ctx,
)
from spkd.app.schemas import (
    Health,
    Ready,
)
from spkd.core import store

log = logging.getLogger("spkd.api")

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness (no auth)")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Ready,
    tags=["ops"],
    summary="Readiness: Redis and at least one worker",
    responses={503: {"model": Ready}},
)
def readyz(ctx: Ctx) -> Any:
    r, keys, settings = ctx.redis, ctx.keys, ctx.settings
    try:
        r.ping()
        live = store.live_workers(r, keys, settings.heartbeat_ttl_s, settings.queue)
    except redis.exceptions.RedisError as e:
        body = Ready(status="not_ready", redis=False, workers=0, detail=f"redis: {e}")
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    if not live:
        body = Ready(
            status="not_ready", redis=True, workers=0, detail=f"no live worker on queue {settings.queue!r}"
        )
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    return Ready(status="ready", redis=True, workers=len(live), max_devices=store.most_devices(live))


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}}},
    response_class=Response,
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
