"""``coalition-watch run``: one process, one event loop, the scheduler and the HTTP server.

Before the scheduler starts, the leases left by a dead process on this host, or by an earlier
process under this one's own name, are freed (:func:`service.jobs.free_dead_leases`).

SIGINT/SIGTERM stop the scheduler from taking new work, let running jobs finish (their leases
cover a crash), stop the HTTP server and return, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from datetime import datetime, timedelta
from types import FrameType

import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from service.context import AppContext
from service.http import Readiness, create_app
from service.jobs import JobSpec, free_dead_leases, job_specs

log = logging.getLogger(__name__)

# Work under way gets this long to finish after SIGTERM; the HTTP server gets 2 s more. Both
# stay well inside the 10 s stop budget (systemd, compose) even on a loaded machine.
SHUTDOWN_GRACE_SECONDS = 5.0


def build_scheduler(ctx: AppContext, specs: list[JobSpec] | None = None) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone="UTC")
    now = datetime.now().astimezone()
    for i, spec in enumerate(job_specs(ctx) if specs is None else specs):
        scheduler.add_job(
            spec.func,
            "interval",
            seconds=spec.interval_seconds,
            args=[ctx],
            id=spec.name,
            name=spec.name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=ctx.settings.scheduler.misfire_grace_time,
            # First runs right away, a little staggered so the stages start in flow order.
            next_run_time=now + timedelta(seconds=0.2 * i),
        )
    return scheduler


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coalition-watch")
    except PackageNotFoundError:
        return "unknown"


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: the runner owns SIGINT/SIGTERM."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return

    def capture_signals(self):  # type: ignore[no-untyped-def]  # uvicorn >= 0.29
        import contextlib

        return contextlib.nullcontext()


class ListenError(Exception):
    """The HTTP address cannot be used; the message names it and what to change."""


def listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP address first, so a busy port stops the start with one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another coalition-watch "
            "running? set http.host/http.port, e.g. COALITION_WATCH_HTTP__PORT=8001)"
        ) from exc
    return sock


async def serve(ctx: AppContext) -> bool:
    """Run until a signal; returns True once all work under way has finished."""
    sock = listen(ctx.settings.http.host, ctx.settings.http.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def _on_signal(signum: int, _frame: FrameType | None = None) -> None:
        log.info("signal %s received: shutting down", signal.Signals(signum).name)
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, sig)

    ctx.metrics.build_info.labels(_version()).set(1)
    readiness = Readiness()
    app = create_app(ctx, readiness)
    config = uvicorn.Config(
        app,
        host=ctx.settings.http.host,
        port=ctx.settings.http.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = _Server(config)
    specs = job_specs(ctx, readiness.checks)  # /readyz: "model: loading" until it is loaded
    try:  # the work a killed predecessor held is taken again now, not after its leases
        await asyncio.to_thread(free_dead_leases, ctx)
    except Exception as exc:  # the database is checked at every job run anyway
        log.warning("could not free the leases of dead processes (%s): they expire instead", exc)
    scheduler = build_scheduler(ctx, specs)
    scheduler.start()
    readiness.scheduler_running = True
    starting: list[asyncio.Future[None]] = [  # kept referenced until they finish
        asyncio.ensure_future(spec.start(ctx)) for spec in specs if spec.start is not None
    ]
    server_task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
    log.info(
        "coalition-watch running on http://%s:%s; jobs: %s",
        ctx.settings.http.host,
        ctx.settings.http.port,
        ", ".join(f"{spec.name} every {spec.interval_seconds:g} s" for spec in specs),
    )
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({server_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    readiness.scheduler_running = False
    # Stop taking new work; let work under way finish within the grace period.
    ctx.stopping.set()
    scheduler.shutdown(wait=False)
    for task in starting:
        task.cancel()  # the work itself is in ctx.inflight, shielded
    if ctx.inflight:
        await asyncio.wait(set(ctx.inflight), timeout=SHUTDOWN_GRACE_SECONDS)
    unfinished = len([f for f in ctx.inflight if not f.done()])
    server.should_exit = True
    if server_task in done and server_task.exception() is not None:
        raise server_task.exception()  # type: ignore[misc]
    try:
        await asyncio.wait_for(server_task, timeout=2)
    except TimeoutError:
        log.warning("HTTP server did not stop within 2 s; exiting anyway")
        unfinished += 1
    stop_task.cancel()
    if unfinished:
        log.warning(
            "%d job(s) still running after %.0fs: leaving them to their leases",
            unfinished,
            SHUTDOWN_GRACE_SECONDS,
        )
        # asyncio.run would join the worker threads without a time limit: leave now instead.
        logging.shutdown()
        os._exit(0)
    log.info("coalition-watch stopped")
    return True


def run(ctx: AppContext) -> None:
    """Serve until SIGINT/SIGTERM, then exit 0 within the stop timeout.

    Work still running after the grace period holds leases that expire on their own, so the
    process may exit without waiting for it: nothing was committed for it, nothing is lost.
    """
    try:
        asyncio.run(serve(ctx))
    except ListenError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc
