"""The HTTP side: probes, /health, /metrics and the authenticated admin API (runbook 2-4).

Every `curl` of the runbook has an endpoint here, with one difference on purpose: all but
health, probes and metrics require a bearer token from `http.admin_tokens`, compared in
constant time, and every call that changes something - or is refused - is written to the
audit log with the token's name and the caller's address.
"""

import asyncio
import hmac
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import BaseModel, ConfigDict, Field

from relay import __version__
from relay.api.bounces import bounce_router
from relay.clock import utcnow
from relay.config import Settings
from relay.delivery.providers import Provider, validate_all
from relay.delivery.routing import Router
from relay.ingest.handler import IngestHandler
from relay.ingest.protocol import Gate
from relay.limits import Override
from relay.logs import event
from relay.metrics import provider_health_of_every_process
from relay.processes import multiprocess_metrics
from relay.queue.sql import SqlStore

log = logging.getLogger("relay.api")

_PING_TIMEOUT_S = 2.0
_QUEUE_WARNING = 5000  # runbook 1.2: critical threshold for queue depth
_STATS_WINDOW = timedelta(hours=1)
# Bounds on counts in request bodies: the database columns are 32-bit.
_MAX_COUNT = 2_000_000_000


class RelayView(Protocol):
    """What the API needs from the running relay."""

    settings: Settings
    store: SqlStore
    router: Router
    gate: Gate
    handler: IngestHandler
    providers: dict[str, Provider]

    def wake(self) -> None: ...

    async def set_maintenance(self, enabled: bool, message: str | None, by: str) -> None: ...


# Payloads


class Check(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy", "warning"]
    message: str | None = None


class Health(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    timestamp: datetime
    version: str
    checks: dict[str, Check]


class Stats(BaseModel):
    counts: dict[str, int] = Field(description="Messages by status, whole queue.")
    queue_depth: int = Field(description="Queued plus processing.")
    deferred: int = Field(description="Queued messages waiting for a retry.")
    oldest_queued_age_seconds: float | None
    window_seconds: int = Field(description="Period the rates below are taken over.")
    delivered: int
    failed: int
    bounced: int
    delivery_rate: float | None = Field(description="Percent of finished messages delivered.")
    error_rate: float | None = Field(description="Percent of finished messages not delivered.")


class ProviderHealth(BaseModel):
    provider: str
    healthy: bool
    state: str
    consecutive_failures: int
    last_error: str | None
    last_error_kind: str | None
    needs_attention: bool
    retry_in_seconds: float | None
    last_success_at: float | None
    last_failure_at: float | None


class WorkspaceLimits(BaseModel):
    workspace: str
    rate_limit_burst: int
    rate_limit_refill: float
    rate_limit_remaining: float | None = Field(description="Tokens left on this replica.")
    workspace_daily: int | None
    per_user_daily: int | None
    used_today: int
    override_expires_at: datetime | None


class OverrideRequest(BaseModel):
    """Runbook 4.7's override body; `workspace` defaults to smtp.workspace."""

    model_config = ConfigDict(extra="forbid")

    workspace: str | None = Field(None, min_length=1, max_length=255)
    workspace_daily: int | None = Field(None, ge=0, le=_MAX_COUNT)
    per_user_daily: int | None = Field(None, ge=0, le=_MAX_COUNT)
    rate_limit_burst: int | None = Field(None, ge=1, le=_MAX_COUNT)
    rate_limit_refill: float | None = Field(None, gt=0, le=1_000_000)
    duration_seconds: int = Field(3600, ge=60, le=7 * 86400, description="Default 1 h.")
    emergency_mode: bool = Field(False, description="Recorded in the audit log.")


class Outcome(BaseModel):
    ok: bool
    detail: str | None = None
    count: int | None = None


class RequeueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    older_than_minutes: int = Field(
        30, ge=1, le=366 * 24 * 60, description="Runbook 4.2: 30 minutes."
    )
    reset_retry_count: bool = False


class CleanupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(
        3, ge=1, le=_MAX_COUNT, description="Hard bounces that make an address INACTIVE."
    )


class MaintenanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool
    message: str | None = Field(None, max_length=200)


class ProviderCheck(BaseModel):
    provider: str
    ok: bool
    kind: str | None
    error: str | None


class TestRequest(BaseModel):
    workspace: str | None = None


class RecipientView(BaseModel):
    email_address: str
    delivery_status: str
    error: str | None
    provider: str | None
    provider_message_id: str | None
    sent_at: datetime | None
    attempts: int


class MessageView(BaseModel):
    id: str
    workspace_id: str
    from_email: str
    status: str
    error: str | None
    retry_count: int
    queued_at: datetime
    processed_at: datetime | None
    next_attempt_at: datetime
    recipients: list[RecipientView]


# The app


def create_app(relay: RelayView) -> FastAPI:
    app = FastAPI(
        title="smtp-relay",
        version=__version__,
        description="Health, metrics and the admin API of the SMTP relay. Admin endpoints "
        "take `Authorization: Bearer <token>` (http.admin_tokens).",
    )
    bearer = HTTPBearer(auto_error=False)

    async def audit(request: Request, who: str | None, outcome: str, detail: Any = None) -> None:
        try:
            await relay.store.audit(
                action=f"api {request.method} {request.url.path}",
                outcome=outcome,
                user_id=who,
                ip_address=request.client.host if request.client else None,
                detail=json.dumps(detail, default=str)[:2000] if detail is not None else None,
            )
        except Exception as exc:
            event(log, "audit.write_failed", logging.ERROR, error=exc.__class__.__name__)

    async def admin(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        presented = credentials.credentials.encode() if credentials else b""
        holder = None
        # Compare with every token, so the time taken does not tell which one matched.
        for token in relay.settings.http.admin_tokens:
            if hmac.compare_digest(presented, token.value().encode()) and presented:
                holder = token.name
        if holder is None:
            reason = "no token" if credentials is None else "wrong token"
            if not relay.settings.http.admin_tokens:
                reason = "admin API disabled: no http.admin_tokens configured"
            await audit(request, None, "denied", {"reason": reason})
            raise HTTPException(
                status_code=401, detail=reason, headers={"WWW-Authenticate": "Bearer"}
            )
        return holder

    Admin = Annotated[str, Depends(admin)]
    app.include_router(bounce_router(relay.handler.bounces, authorize=admin))

    # Probes, health, metrics: open, as Kubernetes and Prometheus need them.

    @app.get("/healthz", tags=["probes"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["probes"], summary="Readiness: accepting mail, database reachable")
    async def readyz() -> JSONResponse:
        checks = {"smtp": "accepting" if relay.gate.open else "not accepting"}
        try:
            await asyncio.wait_for(relay.store.ping(), timeout=_PING_TIMEOUT_S)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable: {exc.__class__.__name__}"
        ready = relay.gate.open and checks["database"] == "ok"
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get(
        "/health",
        tags=["probes"],
        response_model=Health,
        summary="Runbook 3.3: database, providers, queue",
        responses={503: {"model": Health, "description": "unhealthy"}},
    )
    async def health() -> JSONResponse:
        report = await _health(relay)
        return JSONResponse(
            json.loads(report.model_dump_json()),
            status_code=503 if report.status == "unhealthy" else 200,
        )

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics")
    async def metrics() -> Response:
        if not multiprocess_metrics():
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
        # Every process's samples, added up as each metric's multiprocess mode says.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Reading

    @app.get("/api/stats", tags=["admin"], response_model=Stats)
    async def stats(who: Admin) -> Stats:
        return await _stats(relay)

    @app.get("/api/providers/health", tags=["admin"], response_model=list[ProviderHealth])
    async def providers_health(who: Admin) -> list[ProviderHealth]:
        return [ProviderHealth(**entry) for entry in _provider_states(relay)]

    @app.get("/api/rate-limit", tags=["admin"], response_model=list[WorkspaceLimits])
    async def rate_limits(who: Admin) -> list[WorkspaceLimits]:
        return await _limits(relay)

    @app.get(
        "/api/messages/{message_id}",
        tags=["admin"],
        response_model=MessageView,
        responses={404: {"description": "no such message"}},
    )
    async def message(message_id: str, who: Admin) -> MessageView:
        found = await relay.store.message_status(message_id[:64])
        if found is None:
            raise HTTPException(status_code=404, detail="no such message")
        return MessageView(**found)

    # Acting

    @app.post("/api/admin/rate-limit", tags=["admin"], response_model=Outcome)
    async def set_override(body: OverrideRequest, request: Request, who: Admin) -> Outcome:
        workspace = body.workspace or relay.settings.smtp.workspace
        expires = utcnow() + timedelta(seconds=body.duration_seconds)
        await relay.store.set_override(
            Override(
                workspace_id=workspace,
                expires_at=expires,
                workspace_daily=body.workspace_daily,
                per_user_daily=body.per_user_daily,
                rate_limit_burst=body.rate_limit_burst,
                rate_limit_refill=body.rate_limit_refill,
                created_by=who,
            )
        )
        relay.handler.overrides.invalidate()
        await audit(request, who, "success", body.model_dump())
        return Outcome(ok=True, detail=f"override for {workspace} until {expires.isoformat()}Z")

    @app.delete("/api/admin/rate-limit", tags=["admin"], response_model=Outcome)
    async def clear_override(
        request: Request, who: Admin, workspace: Annotated[str | None, Query()] = None
    ) -> Outcome:
        name = workspace or relay.settings.smtp.workspace
        cleared = await relay.store.clear_override(name)
        relay.handler.overrides.invalidate()
        await audit(request, who, "success" if cleared else "not_found", {"workspace": name})
        return Outcome(ok=cleared, detail=None if cleared else f"no override for {name}")

    @app.post("/api/process", tags=["admin"], response_model=Outcome)
    async def process(request: Request, who: Admin) -> Outcome:
        made_due = await relay.store.flush(now=utcnow())
        relay.wake()
        await audit(request, who, "success", {"made_due": made_due})
        return Outcome(ok=True, count=made_due, detail="workers woken; deferred mail due now")

    @app.post("/api/admin/requeue-stuck", tags=["admin"], response_model=Outcome)
    async def requeue_stuck(body: RequeueRequest, request: Request, who: Admin) -> Outcome:
        count = await relay.store.requeue_stuck(
            older_than=utcnow() - timedelta(minutes=body.older_than_minutes),
            reset_retries=body.reset_retry_count,
        )
        relay.wake()
        await audit(request, who, "success", {**body.model_dump(), "count": count})
        return Outcome(ok=True, count=count)

    @app.post("/api/admin/recipients/cleanup", tags=["admin"], response_model=Outcome)
    async def recipients_cleanup(body: CleanupRequest, request: Request, who: Admin) -> Outcome:
        count = await relay.store.deactivate_hard_bounces(threshold=body.threshold)
        await audit(request, who, "success", {**body.model_dump(), "count": count})
        return Outcome(ok=True, count=count)

    @app.post("/api/admin/maintenance", tags=["admin"], response_model=Outcome)
    async def maintenance(body: MaintenanceRequest, request: Request, who: Admin) -> Outcome:
        await relay.set_maintenance(body.enabled, body.message, who)
        await audit(request, who, "success", body.model_dump())
        return Outcome(ok=True, detail="maintenance on" if body.enabled else "maintenance off")

    @app.get("/api/admin/maintenance", tags=["admin"], response_model=MaintenanceRequest)
    async def maintenance_status(who: Admin) -> MaintenanceRequest:
        return MaintenanceRequest(enabled=not relay.gate.open, message=relay.gate.closed_reply)

    # Provider credentials, without sending mail (runbook 2.1 and 4.4)

    async def check_one(name: str) -> ProviderCheck:
        provider = relay.providers.get(name)
        if provider is None:
            raise HTTPException(status_code=404, detail=f"no provider named {name}")
        [entry] = await validate_all({name: provider})
        return ProviderCheck(**entry)

    @app.post(
        "/api/test/{provider}",
        tags=["admin"],
        response_model=ProviderCheck,
        responses={404: {"description": "no such provider"}},
    )
    async def test_provider(
        provider: str, request: Request, who: Admin, body: TestRequest | None = None
    ) -> ProviderCheck:
        result = await check_one(provider[:64])
        await audit(
            request,
            who,
            "success" if result.ok else "failure",
            {"provider": provider, "kind": result.kind},
        )
        return result

    async def validate(request: Request, who: str) -> JSONResponse:
        report = await validate_all(relay.providers)
        ok = all(entry["ok"] for entry in report)
        await audit(
            request,
            who,
            "success" if ok else "failure",
            [{"provider": e["provider"], "ok": e["ok"]} for e in report],
        )
        return JSONResponse(report, status_code=200 if ok else 503)

    validate_responses: dict[int | str, dict[str, Any]] = {
        200: {"model": list[ProviderCheck]},
        503: {"model": list[ProviderCheck], "description": "a provider failed"},
    }

    @app.get("/validate", tags=["admin"], responses=validate_responses)
    async def validate_get(request: Request, who: Admin) -> JSONResponse:
        return await validate(request, who)

    @app.post("/validate", tags=["admin"], responses=validate_responses)
    async def validate_post(request: Request, who: Admin) -> JSONResponse:
        return await validate(request, who)

    return app


async def _health(relay: RelayView) -> Health:
    checks: dict[str, Check] = {}
    status = "healthy"
    try:
        await asyncio.wait_for(relay.store.ping(), timeout=_PING_TIMEOUT_S)
        checks["database"] = Check(status="healthy")
    except Exception as exc:
        # Without the database nothing can be accepted (runbook appendix B: critical).
        checks["database"] = Check(status="unhealthy", message=exc.__class__.__name__)
        status = "unhealthy"

    order = relay.settings.delivery.providers
    states = {entry["provider"]: entry for entry in _provider_states(relay)}
    for name, entry in states.items():
        if entry["healthy"]:
            checks[name] = Check(status="healthy")
            continue
        why = f": {entry['last_error_kind']}" if entry["last_error_kind"] else ""
        checks[name] = Check(status="unhealthy", message=f"circuit {entry['state']}{why}")
        # Only the primary degrades the service: the backup being down changes nothing
        # while the primary carries the mail (runbook 3.3).
        if name == order[0] and status == "healthy":
            status = "degraded"
    if states and not any(entry["healthy"] for entry in states.values()) and status == "healthy":
        status = "degraded"

    extra = getattr(relay, "extra_processes", None)
    if extra is not None:
        # The first process still accepts on the shared sockets and delivers: fewer
        # processes is less capacity, not an outage.
        message = f"{extra.running + 1} of {extra.count + 1} running, {extra.restarts} restarts"
        if extra.running < extra.count:
            checks["processes"] = Check(status="unhealthy", message=message)
            status = "degraded" if status == "healthy" else status
        else:
            checks["processes"] = Check(status="healthy", message=message)

    if "database" in checks and checks["database"].status == "healthy":
        depth = (await relay.store.stats(now=utcnow(), finished=False)).depth()
        checks["queue"] = (
            Check(status="warning", message=f"Queue depth: {depth}")
            if depth > _QUEUE_WARNING
            else Check(status="healthy", message=f"Queue depth: {depth}")
        )
    return Health(
        status=status,
        timestamp=datetime.now(UTC),
        version=__version__,
        checks=checks,
    )


def _provider_states(relay: RelayView) -> list[dict[str, Any]]:
    """This process's circuit breakers, each marked unhealthy too when the provider's
    circuit is open in another delivery process of the relay (`delivery.processes`: each
    process has breakers of its own, and this one may not have met the failure yet).

    The other processes' view is the `provider_health` gauge they keep in the shared
    metrics directory, the lowest of the live processes'; the details (error, retry time)
    are this process's.
    """
    elsewhere = provider_health_of_every_process() if multiprocess_metrics() else {}
    states = []
    for entry in relay.router.health():
        if entry["healthy"] and elsewhere.get(entry["provider"], 1.0) < 1.0:
            entry = {**entry, "healthy": False, "state": "open in another process"}
        states.append(entry)
    return states


async def _stats(relay: RelayView) -> Stats:
    now = utcnow()
    queue = await relay.store.stats(now=now)
    finished = await relay.store.outcomes_since(now - _STATS_WINDOW)
    delivered = finished.get("sent", 0)
    failed = finished.get("failed", 0)
    bounced = finished.get("bounced", 0)
    total = delivered + failed + bounced
    age = (now - queue.oldest_queued_at).total_seconds() if queue.oldest_queued_at else None
    return Stats(
        counts=queue.counts,
        queue_depth=queue.depth(),
        deferred=queue.deferred,
        oldest_queued_age_seconds=age,
        window_seconds=int(_STATS_WINDOW.total_seconds()),
        delivered=delivered,
        failed=failed,
        bounced=bounced,
        delivery_rate=round(100 * delivered / total, 2) if total else None,
        error_rate=round(100 * (failed + bounced) / total, 2) if total else None,
    )


async def _limits(relay: RelayView) -> list[WorkspaceLimits]:
    now = utcnow()
    settings = relay.settings
    overrides = {o.workspace_id: o for o in await relay.store.overrides(now=now)}
    names = sorted(set(settings.workspaces) | {settings.smtp.workspace} | set(overrides))
    day = now.date().isoformat()
    report = []
    for name in names:
        limits = settings.workspace(name).limits
        override = overrides.get(name)
        if override is not None:
            limits = override.apply(limits)
        used = await relay.store.quota_used(name, day)
        report.append(
            WorkspaceLimits(
                workspace=name,
                rate_limit_burst=limits.rate_limit_burst,
                rate_limit_refill=limits.rate_limit_refill,
                rate_limit_remaining=relay.handler.limiter.remaining(name),
                workspace_daily=limits.workspace_daily,
                per_user_daily=limits.per_user_daily,
                used_today=used.get("*", 0),
                override_expires_at=override.expires_at if override else None,
            )
        )
    return report
