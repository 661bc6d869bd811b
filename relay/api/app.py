"""The HTTP side: Kubernetes probes now; metrics and the admin API build on this app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from relay import __version__

_PING_TIMEOUT_S = 2.0


@dataclass
class Probes:
    """What readiness depends on, supplied by the running service."""

    database_ping: Callable[[], Awaitable[None]]
    accepting: Callable[[], bool]


def create_app(probes: Probes) -> FastAPI:
    app = FastAPI(title="smtp-relay", version=__version__)

    @app.get("/healthz", tags=["probes"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["probes"], summary="Readiness: accepting mail, database reachable")
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}
        checks["smtp"] = "accepting" if probes.accepting() else "draining"
        try:
            await asyncio.wait_for(probes.database_ping(), timeout=_PING_TIMEOUT_S)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unavailable: {exc.__class__.__name__}"
        ready = checks["smtp"] == "accepting" and checks["database"] == "ok"
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    return app
