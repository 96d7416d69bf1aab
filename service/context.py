"""The wiring: one object holding what the jobs, the CLI and the HTTP app share."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from service.config import Settings
from service.metrics import Metrics
from storage.db import SessionFactory, make_engine, session_factory
from storage.models import utcnow

Clock = Callable[[], datetime]


@dataclass
class AppContext:
    settings: Settings
    engine: sa.Engine
    sessions: SessionFactory
    metrics: Metrics
    clock: Clock = utcnow
    instance_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # Set on shutdown: long jobs check it between batches and stop taking new work.
    stopping: threading.Event = field(default_factory=threading.Event)
    # Work running in threads right now; shutdown waits for it (within a grace period).
    inflight: set[asyncio.Future[object]] = field(default_factory=set)

    def close(self) -> None:
        self.engine.dispose()


def build_context(settings: Settings, metrics: Metrics | None = None) -> AppContext:
    engine = make_engine(settings.database_url)
    ctx = AppContext(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        metrics=metrics or Metrics(),
    )
    if settings.instance_id:
        ctx.instance_id = settings.instance_id
    return ctx
