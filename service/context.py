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


def default_instance_id() -> str:
    """This process's name in the leases it takes, unless ``instance_id`` is set: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_is_running(pid: int) -> bool:
    """Whether a process ``pid`` exists here (another user's counts, an unreaped zombie too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: another user's; otherwise cannot tell
        return True
    return True


def lease_owner_is_dead(owner: str, *, own_id: str | None, hostname: str) -> bool:
    """Whether the process named ``owner`` in a lease is certainly gone.

    ``own_id``: this process's name, when no other live process can be using it (a process
    that has claimed nothing yet and whose name is its own). Otherwise, an owner named
    ``<hostname>:<pid>`` is dead when that pid runs nowhere on this machine. Owners on other
    hosts and names of another form cannot be judged from here: they count as alive, and their
    leases expire as before. Assumes a host name is not shared between machines or containers.
    """
    if own_id is not None and owner == own_id:
        return True
    host, colon, pid = owner.rpartition(":")
    if not colon or host != hostname or not (pid.isascii() and pid.isdigit()):
        return False
    return int(pid) > 0 and not pid_is_running(int(pid))


@dataclass
class AppContext:
    settings: Settings
    engine: sa.Engine
    sessions: SessionFactory
    metrics: Metrics
    clock: Clock = utcnow
    instance_id: str = field(default_factory=default_instance_id)
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
