"""The HTTP app: health, readiness and Prometheus metrics (the JSON API joins it later)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import build_router
from service.context import AppContext


@dataclass
class Readiness:
    """What /readyz reports; the runner flips these as parts come up and go down."""

    scheduler_running: bool = False
    checks: dict[str, str] = field(default_factory=dict)


def create_app(ctx: AppContext, readiness: Readiness) -> FastAPI:
    app = FastAPI(
        title="coalition-watch",
        version="0.1.0",
        description="Coalition of the Willing news monitor: articles, stories, alerts, feeds.",
    )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail), "path": request.url.path},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        return JSONResponse(
            {"error": "; ".join(problems), "path": request.url.path}, status_code=422
        )

    app.state.ctx = ctx
    app.include_router(build_router(ctx))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        # async: answered on the event loop itself, with no hop through the thread pool that
        # the API's database calls share.
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        problems: list[str] = []
        try:
            with ctx.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # any driver error means "not ready"
            problems.append(f"database unreachable: {exc.__class__.__name__}: {exc}")
        if not readiness.scheduler_running:
            problems.append("scheduler not running")
        problems.extend(f"{name}: {why}" for name, why in readiness.checks.items() if why)
        body: dict[str, Any] = {"status": "ok" if not problems else "unavailable"}
        if problems:
            body["reasons"] = problems
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
