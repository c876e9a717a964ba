"""The FastAPI app: the v1 REST API over the Redis job store (docs/api.md). Never imports
torch.

`create_app(settings)` builds an app from the routers in `app/routes/` (one per resource);
`app` (module level) is what `uvicorn spkd.app.main:app` serves.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis
import redis.asyncio as aredis
from fastapi import FastAPI
from PIL import Image

from spkd.app import validation
from spkd.app.auth import AuthLimiter, KeyRing
from spkd.app.errors import install_error_handlers
from spkd.app.live import Live
from spkd.app.metrics import HISTOGRAMS, Metrics, MetricsMiddleware, StoreSnapshot
from spkd.app.middleware import BodyLimitMiddleware, TextMiddleware
from spkd.app.routes import ROUTERS
from spkd.core import storage, store
from spkd.core.queue import make_celery, queue_depth
from spkd.core.settings import Settings, get_settings

log = logging.getLogger("spkd.api")


# ---------------------------------------------------------------- the app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    keys = store.Keys(settings.redis_prefix)
    r = store.connect(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # XREAD BLOCK for SSE on an async client, bound to the server's event loop.
        app.state.aredis = aredis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=2, socket_timeout=10
        )
        await anyio.to_thread.run_sync(_sweep_at_start, r, keys, settings)
        app.state.validator = validation.Validator(r, keys, settings)
        app.state.validator.start()  # picks up validations a previous process left unfinished
        app.state.live = Live(settings, keys)  # one Redis reader fans events out to every SSE stream
        await app.state.live.start()
        yield
        await app.state.live.stop()
        app.state.validator.close()
        await app.state.aredis.aclose()

    app = FastAPI(
        title="spkd",
        version="1.0.0",
        summary="Distil a large ImageNet teacher into a small student with Similarity-Preserving KD",
        lifespan=lifespan,
    )
    app.state.settings, app.state.keys, app.state.redis = settings, keys, r
    app.state.keyring = KeyRing(settings)
    app.state.auth_limiter = AuthLimiter(r, keys, settings)
    app.state.celery = make_celery(settings)
    app.state.metrics = Metrics(
        lambda: StoreSnapshot(
            jobs_by_status=store.count_by_status(r, keys),
            queue_depth=queue_depth(r, settings),
            live_workers=len(store.live_workers(r, keys, settings.heartbeat_ttl_s)),
            histograms={h[1]: store.read_histogram(r, keys, h[1]) for h in HISTOGRAMS},
        )
    )
    # Outermost last: metrics see every answer, the guards answer before any route parses.
    app.add_middleware(BodyLimitMiddleware, state=app.state)
    app.add_middleware(TextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    _mount_dashboard(app)
    return app


def _sweep_at_start(r: redis.Redis, keys: store.Keys, settings: Settings) -> None:
    """Leftovers of a killed API (upload temporaries, unrecorded folders): best effort, the API
    starts even when Redis or the volumes misbehave."""
    try:
        storage.sweep(r, keys, settings)
    except Exception:  # noqa: BLE001
        log.exception("sweep of leftovers at start failed")


def _mount_dashboard(app: FastAPI) -> None:
    try:
        from spkd.app.routes import dashboard
    except ImportError:  # the dashboard is optional for the API
        return
    app.include_router(dashboard.router)


app = create_app()
