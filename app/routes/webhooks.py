"""Webhook routes: register, list, describe and delete a key's webhooks, and read a webhook's
delivery log. Nothing is sent from here: job events reach the outbox in the job store's own
transactions (core/webhook_outbox.py) and the workers' sender delivers them (workers/webhooks.py).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from spkd.app.deps import AppContext, Ctx, Owner
from spkd.app.errors import ApiError, not_found
from spkd.app.openapi import error_responses
from spkd.core import webhook_security, webhook_store
from spkd.core.webhook_outbox import DEFAULT_EVENTS, EVENT_TYPES

EventType = Literal[EVENT_TYPES]  # the outbox's event types, one list (a tuple subscripts Literal)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _iso(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts else None


# ---------------------------------------------------------------- schemas


class WebhookIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"url": "https://example.com/spkd-hook", "events": ["job.succeeded"]}},
    )
    url: str = Field(min_length=1, max_length=webhook_security.MAX_URL_LENGTH, description="http(s) URL")
    events: list[EventType] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=len(EVENT_TYPES),
        description="event types to receive; default: the three final ones",
    )


class Webhook(BaseModel):
    id: str
    object: Literal["webhook"] = "webhook"
    url: str
    events: list[EventType]
    created_at: datetime

    @classmethod
    def from_store(cls, hook: dict[str, Any]) -> Webhook:
        return cls(id=hook["id"], url=hook["url"], events=hook["events"], created_at=_iso(hook["created_at"]))


class WebhookCreated(Webhook):
    secret: str = Field(
        description="the signing secret (`whsec_` + base64): shown only in this response",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Webhook]


class Attempt(BaseModel):
    at: datetime
    status_code: int | None = Field(default=None, description="the receiver's HTTP status; null: no answer")
    error: str | None = Field(default=None, description="why the attempt failed (timeout, refused...)")
    duration_ms: float


class Delivery(BaseModel):
    id: str
    object: Literal["delivery"] = "delivery"
    message_id: str = Field(description="the `webhook-id` header: the same for every attempt")
    type: EventType
    job_id: str
    status: Literal["pending", "delivered", "failed"] = Field(
        description="failed: gave up after SPKD_WEBHOOK_MAX_ATTEMPTS (or a 410 Gone)"
    )
    created_at: datetime
    next_attempt_at: datetime | None = None
    attempts: list[Attempt]

    @classmethod
    def from_store(cls, d: dict[str, Any]) -> Delivery:
        attempts = [Attempt(**dict(a, at=_iso(a["at"]))) for a in d["attempts"]]
        return cls(
            id=d["id"],
            message_id=d["msg_id"],
            type=d["type"],
            job_id=d["job_id"],
            status=d["status"],
            created_at=_iso(d["created_at"]),
            next_attempt_at=_iso(d["next_attempt_at"]) if d["status"] == "pending" else None,
            attempts=attempts,
        )


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Delivery]


# ---------------------------------------------------------------- routes


def _own_hook(ctx: AppContext, owner: str, hook_id: str) -> dict[str, Any]:
    r, prefix = ctx.redis, ctx.keys.prefix
    hook = webhook_store.get_webhook(r, prefix, hook_id, owner)
    if hook is None:
        raise not_found("webhook", hook_id)
    return hook


@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    responses=error_responses(400, 409, 422),
    summary="Register a webhook",
    description="The URL must be http(s) and resolve to public addresses only (private, loopback, "
    "link-local, multicast and reserved ones are refused unless the server sets "
    "SPKD_WEBHOOKS_ALLOW_PRIVATE). The response carries the signing `secret`, shown only here.",
)
async def create_webhook(ctx: Ctx, owner: Owner, body: WebhookIn) -> WebhookCreated:
    r, prefix, settings = ctx.redis, ctx.keys.prefix, ctx.settings
    try:  # DNS lookups block: off the event loop
        await anyio.to_thread.run_sync(webhook_security.check_url, body.url, settings.webhooks_allow_private)
    except webhook_security.UrlRefused as e:
        raise ApiError(422, e.code, e.message, "url") from None
    events = list(dict.fromkeys(body.events))  # de-duplicated, in the order given
    try:
        hook = await anyio.to_thread.run_sync(
            webhook_store.create_webhook,
            r,
            prefix,
            owner,
            body.url,
            events,
            webhook_security.new_secret(),
            settings.webhook_max_per_key,
        )
    except webhook_store.TooMany as e:
        raise ApiError(409, "too_many_webhooks", str(e)) from None
    return WebhookCreated(**Webhook.from_store(hook).model_dump(), secret=hook["secret"])


@router.get(
    "", response_model=WebhookList, responses=error_responses(), summary="List webhooks, newest first"
)
def list_webhooks(ctx: Ctx, owner: Owner) -> WebhookList:
    r, prefix = ctx.redis, ctx.keys.prefix
    return WebhookList(data=[Webhook.from_store(h) for h in webhook_store.list_webhooks(r, prefix, owner)])


@router.get(
    "/{webhook_id}", response_model=Webhook, responses=error_responses(404), summary="Describe a webhook"
)
def get_webhook(ctx: Ctx, owner: Owner, webhook_id: str) -> Webhook:
    return Webhook.from_store(_own_hook(ctx, owner, webhook_id))


@router.delete(
    "/{webhook_id}",
    status_code=204,
    response_class=Response,
    responses=error_responses(404),
    summary="Delete a webhook (pending deliveries are dropped)",
)
def delete_webhook(ctx: Ctx, owner: Owner, webhook_id: str) -> Response:
    r, prefix = ctx.redis, ctx.keys.prefix
    _own_hook(ctx, owner, webhook_id)
    webhook_store.delete_webhook(r, prefix, webhook_id, owner)
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryList,
    responses=error_responses(404, 422),
    summary="The webhook's delivery log, newest first",
    description="One entry per event sent to this webhook: its attempts (time, HTTP status, error, "
    "duration) and whether it was delivered, is waiting for a retry, or was given up. The last "
    "SPKD_WEBHOOK_LOG_SIZE deliveries are kept.",
)
def list_deliveries(
    ctx: Ctx, owner: Owner, webhook_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> DeliveryList:
    r, prefix = ctx.redis, ctx.keys.prefix
    _own_hook(ctx, owner, webhook_id)
    items = webhook_store.list_deliveries(r, prefix, webhook_id, limit)
    return DeliveryList(data=[Delivery.from_store(d) for d in items])
