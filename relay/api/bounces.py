"""HTTP for bounces: Mailgun's webhook, and the suppression list and bounce statistics.

`bounce_router` returns an APIRouter to include in the app. The admin routes take their
caller from the `authorize` dependency the app passes in (whatever it returns names the
caller in the audit log), so this module has no opinion on tokens. The webhook is not an
admin route: Mailgun authenticates each call with its signature (mailgun_events).
"""

# No `from __future__ import annotations`: FastAPI must see the route annotations as
# objects, and `Caller` below is local to the router factory.
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from relay.bounces import mailgun_events
from relay.bounces.metrics import suppressions_total, webhook_requests_total
from relay.bounces.model import MessageBusy, SuppressionReason
from relay.bounces.suppression import BounceProcessor
from relay.clock import utcnow
from relay.ingest.policy import AddressError, normalise
from relay.logs import event
from relay.queue.store import StoreUnavailable

log = logging.getLogger("relay.api.bounces")


class WebhookReply(BaseModel):
    status: Literal["accepted", "ignored", "duplicate", "rejected", "retry"]
    detail: str | None = None


class BounceEventView(BaseModel):
    at: datetime
    source: str
    type: str
    status: str | None
    reason: str | None
    message_id: str | None


class SuppressionView(BaseModel):
    workspace_id: str
    email_address: str
    status: str = Field(description="ACTIVE, BOUNCED, or INACTIVE (suppressed).")
    reason: str | None = Field(description="hard_bounce, complaint or manual when INACTIVE.")
    detail: str | None
    created_by: str | None
    since: datetime
    bounce_type: str | None
    bounce_count: int
    last_bounce_date: datetime | None
    events: list[BounceEventView] | None = None


class SuppressionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(min_length=3, max_length=320)
    workspace: str | None = Field(None, min_length=1, max_length=255)
    reason: Literal["manual", "complaint", "hard_bounce"] = "manual"
    detail: str | None = Field(None, max_length=500)


class SuppressionChange(BaseModel):
    ok: bool
    detail: str


class TypeCount(BaseModel):
    workspace_id: str
    bounce_type: str | None
    count: int
    unique_emails: int


class DomainCount(BaseModel):
    domain: str
    bounce_count: int


class ReasonCount(BaseModel):
    bounce_reason: str | None
    count: int


class BounceStats(BaseModel):
    """Runbook 4.3's three queries."""

    since: datetime
    by_workspace_and_type: list[TypeCount]
    domains: list[DomainCount]
    reasons: list[ReasonCount]


def bounce_router(processor: BounceProcessor, *, authorize: Callable[..., Any]) -> APIRouter:
    """The routes; `authorize` is a FastAPI dependency guarding the admin ones."""
    router = APIRouter()
    store = processor.store
    settings = processor.settings
    Caller = Annotated[Any, Depends(authorize)]

    def workspace_of(name: str | None) -> str:
        return name or settings.smtp.workspace

    def mailbox(address: str) -> str:
        try:
            return normalise(address.strip(), smtputf8=True, role="recipient").lower()
        except AddressError as exc:
            raise HTTPException(status_code=422, detail=str(exc.args[0])[4:]) from None

    async def audit(request: Request, who: Any, action: str, detail: dict[str, Any]) -> None:
        try:
            await store.audit(
                action=action,
                outcome="success",
                user_id=str(who),
                ip_address=request.client.host if request.client else None,
                detail=json.dumps(detail, default=str)[:2000],
            )
        except Exception as exc:
            event(log, "audit.write_failed", logging.ERROR, error=exc.__class__.__name__)

    # Mailgun

    def reply(status: int, outcome: str, detail: str) -> JSONResponse:
        webhook_requests_total.labels("mailgun", outcome).inc()
        word = {200: "accepted", 406: "rejected", 503: "retry"}[status]
        if outcome in ("ignored", "duplicate"):
            word = outcome
        body = {"status": word, "detail": detail}
        return JSONResponse(WebhookReply.model_validate(body).model_dump(), status_code=status)

    @router.post(
        "/webhooks/mailgun",
        tags=["webhooks"],
        summary="Mailgun events (signed; 406 = rejected for good, 503 = try again)",
        response_model=WebhookReply,
        responses={406: {"model": WebhookReply}, 503: {"model": WebhookReply}},
    )
    async def mailgun(request: Request) -> JSONResponse:
        key = settings.bounces.resolved_mailgun_signing_key()
        if not key:
            # Not 406: once the key is configured, Mailgun's retries get through.
            return reply(503, "unconfigured", "bounces.mailgun_webhook_signing_key is not set")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > mailgun_events.MAX_BODY:
            return reply(406, "malformed", "body too large")
        body = await request.body()
        if len(body) > mailgun_events.MAX_BODY:
            return reply(406, "malformed", "body too large")
        now = utcnow()
        try:
            call = mailgun_events.verify(body, key, now=now)
        except mailgun_events.WebhookRejected as rejected:
            outcome = str(rejected.args[0])
            event(log, "webhook.rejected", logging.WARNING, provider="mailgun", outcome=outcome)
            return reply(406, outcome, outcome.replace("_", " "))

        bounce = mailgun_events.to_bounce_event(call.event)
        once = mailgun_events.once_keys(call, now=now)
        try:
            result = await processor.apply([bounce] if bounce else [], once=once, now=now)
        except (StoreUnavailable, MessageBusy) as exc:
            event(log, "webhook.retry", logging.WARNING, provider="mailgun", error=str(exc))
            return reply(503, "retry", "try again later")
        if result.duplicate == "mailgun-token":
            return reply(406, "replay", "token already used")
        if result.duplicate is not None:
            return reply(200, "duplicate", "event already processed")
        if bounce is None or not result.applied or not result.applied[0].matched:
            return reply(200, "ignored", "not an event about a message of this relay")
        return reply(200, "accepted", bounce.kind.value.lower())

    # Suppressions

    @router.get("/api/suppressions", tags=["bounces"], response_model=list[SuppressionView])
    async def list_suppressions(
        who: Caller,
        workspace: Annotated[str | None, Query(max_length=255)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    ) -> list[SuppressionView]:
        found = await store.suppressions(workspace_id=workspace, limit=limit, offset=offset)
        return [SuppressionView(**entry) for entry in found]

    @router.get(
        "/api/suppressions/{workspace}/{address:path}",
        tags=["bounces"],
        response_model=SuppressionView,
        responses={404: {"description": "the address never bounced nor was suppressed"}},
    )
    async def show_suppression(workspace: str, address: str, who: Caller) -> SuppressionView:
        record = await store.recipient_record(workspace_id=workspace, address=mailbox(address))
        if record is None:
            raise HTTPException(status_code=404, detail="no bounce record for this address")
        return SuppressionView(**record)

    @router.post("/api/suppressions", tags=["bounces"], response_model=SuppressionChange)
    async def add_suppression(
        body: SuppressionRequest, request: Request, who: Caller
    ) -> SuppressionChange:
        workspace, address = workspace_of(body.workspace), mailbox(body.address)
        reason = SuppressionReason(body.reason)
        added = await store.suppress(
            workspace_id=workspace,
            address=address,
            reason=reason,
            detail=body.detail,
            created_by=str(who),
            now=utcnow(),
        )
        if added:
            suppressions_total.labels(reason.value).inc()
        await audit(request, who, "suppression.add", {**body.model_dump(), "added": added})
        return SuppressionChange(
            ok=True, detail="suppressed" if added else "already suppressed (unchanged)"
        )

    @router.delete(
        "/api/suppressions/{workspace}/{address:path}",
        tags=["bounces"],
        response_model=SuppressionChange,
        responses={404: {"description": "the address was not suppressed"}},
    )
    async def remove_suppression(
        workspace: str, address: str, request: Request, who: Caller
    ) -> SuppressionChange:
        removed = await store.unsuppress(
            workspace_id=workspace, address=mailbox(address), now=utcnow()
        )
        await audit(
            request,
            who,
            "suppression.remove",
            {"workspace": workspace, "address": address, "removed": removed},
        )
        if not removed:
            raise HTTPException(status_code=404, detail="the address was not suppressed")
        return SuppressionChange(ok=True, detail="suppression lifted; bounce count reset")

    # Statistics

    @router.get("/api/bounces/stats", tags=["bounces"], response_model=BounceStats)
    async def stats(
        who: Caller,
        workspace: Annotated[str | None, Query(max_length=255)] = None,
        hours: Annotated[int, Query(ge=1, le=24 * 366)] = 24,
    ) -> BounceStats:
        since = utcnow() - timedelta(hours=hours)
        found = await store.bounce_stats(since=since, workspace_id=workspace)
        return BounceStats.model_validate({"since": since, **found})

    return router
