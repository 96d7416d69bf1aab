"""Scheduler jobs: one orchestration function per stage, reading top to bottom like the flow.

Each job runs its blocking work (database, model) in a worker thread so the event loop, and
with it ``/healthz``, stays responsive. A job records its outcome in the metrics and never
lets an exception escape into the scheduler: the next run simply tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from collectors.seeds import SeedIngestResult, ingest_seeds
from service.context import AppContext
from storage.db import transaction
from storage.retention import RetentionResult, purge

log = logging.getLogger(__name__)

JobFunc = Callable[[AppContext], Awaitable[None]]


@dataclass(frozen=True)
class JobSpec:
    name: str
    func: JobFunc
    interval_seconds: float


def run_seeds(ctx: AppContext) -> SeedIngestResult:
    """Scan the seed folder → parse → store new or changed files."""
    with transaction(ctx.sessions) as session:
        result = ingest_seeds(session, ctx.settings.seeds_dir, ctx.clock())
    ctx.metrics.entries_ingested.labels("seed", "added").inc(result.added)
    ctx.metrics.entries_ingested.labels("seed", "updated").inc(result.updated)
    return result


async def seeds_job(ctx: AppContext) -> None:
    await _guarded(ctx, "seeds", lambda: run_seeds(ctx))


def run_retention(ctx: AppContext) -> RetentionResult:
    """Forget processed articles older than the retention window."""
    with transaction(ctx.sessions) as session:
        result = purge(session, ctx.clock(), ctx.settings.retention_days)
    if result.articles:
        log.info("retention removed %d articles, %d stories", result.articles, result.stories)
    return result


async def retention_job(ctx: AppContext) -> None:
    await _guarded(ctx, "retention", lambda: run_retention(ctx))


async def _guarded(ctx: AppContext, stage: str, work: Callable[[], object]) -> None:
    if ctx.stopping.is_set():
        return
    future: asyncio.Future[object] = asyncio.ensure_future(asyncio.to_thread(work))
    ctx.inflight.add(future)
    future.add_done_callback(ctx.inflight.discard)
    try:
        # Shielded: a scheduler shutdown cancels the job, not the work already under way.
        await asyncio.shield(future)
    except asyncio.CancelledError:
        return
    except Exception:
        ctx.metrics.stage_failed(stage)
        log.exception("job failed", extra={"job": stage})
    else:
        ctx.metrics.stage_succeeded(stage)


def job_specs(ctx: AppContext) -> list[JobSpec]:
    s = ctx.settings
    return [
        JobSpec("seeds", seeds_job, s.scheduler.seeds_interval),
        JobSpec("retention", retention_job, s.scheduler.retention_interval),
    ]
