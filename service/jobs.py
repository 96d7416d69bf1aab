"""Scheduler jobs: one orchestration function per stage, reading top to bottom like the flow.

Each job runs its blocking work (database, model) in a worker thread so the event loop, and
with it ``/healthz``, stays responsive. A job records its outcome in the metrics and never
lets an exception escape into the scheduler: the next run simply tries again.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import httpx

from alerts.evaluate import EvaluationResult, evaluate_batch, pending_evaluation
from alerts.notifiers import NotifierDeps
from alerts.outbox import DeliverResult, deliver_due, flush_due_alerts, outbox_stats
from alerts.rules import RuleSet, RulesWatcher
from collectors.feeds import FeedCollector, PollResult
from collectors.fetch import make_http_client
from collectors.seeds import SeedIngestResult, ingest_seeds
from processors.classifier import (
    DEFAULT_ENCODER,
    Classifier,
    ClassifierOptions,
    load_classifier,
)
from processors.classify import BatchStats, ClassifyResult, classify_pending, count_pending
from processors.e5convert import build_model
from service.context import AppContext, lease_owner_is_dead
from service.metrics import Metrics
from storage.claims import release_dead_leases
from storage.db import transaction
from storage.retention import RetentionResult, purge

log = logging.getLogger(__name__)

JobFunc = Callable[[AppContext], Awaitable[None]]


@dataclass(frozen=True)
class JobSpec:
    name: str
    func: JobFunc
    interval_seconds: float
    # Run once when the service starts, beside the schedule (e.g. loading the model).
    start: JobFunc | None = None


def free_dead_leases(ctx: AppContext, *, own_id_is_free: bool = True) -> dict[str, int]:
    """Before claiming anything, free the leases that processes known to be dead left behind.

    Dead: this process's own ``instance_id`` (when ``own_id_is_free``: nothing else runs under
    it, and this process has claimed nothing yet), and ``<this host>:<pid>`` where no process
    ``pid`` runs. Their rows are claimed again at once instead of after their lease. A one-shot
    command beside a running service shares a configured ``instance_id`` with it: it passes
    ``own_id_is_free=False`` then.
    """
    own_id = ctx.instance_id if own_id_is_free else None
    hostname = socket.gethostname()
    released = release_dead_leases(
        ctx.sessions, lambda owner: lease_owner_is_dead(owner, own_id=own_id, hostname=hostname)
    )
    for owner, count in released.items():
        log.info(
            "released %d leases left by dead process %s", count, owner, extra={"lease_owner": owner}
        )
    return released


def run_seeds(ctx: AppContext) -> SeedIngestResult:
    """Scan the seed folder → parse → store new or changed files."""
    folder = ctx.settings.seeds_dir
    if not folder.is_dir():  # a service may run on feeds alone: say so, without a traceback
        log.warning("no seed folder at %s (seeds_dir): no seeds to ingest", folder.resolve())
        return SeedIngestResult()
    with transaction(ctx.sessions) as session:
        result = ingest_seeds(session, folder, ctx.clock())
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


@dataclass
class ClassifyJobs:
    """The classifier, loaded once (in a worker thread) and kept for the process.

    ``checks`` is the readiness table that ``/readyz`` reports: its ``model`` entry reads
    ``loading`` until the classifier is loaded (then empty: ready), or why loading failed.
    """

    options: ClassifierOptions
    _classifier: Classifier | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    checks: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Keys are set here, before the HTTP server reads them; later only values change.
        self.checks["model"] = "" if self._classifier is not None else "loading"

    def classifier(self) -> Classifier:
        with self._lock:
            if self._classifier is None:
                try:
                    if self.options.encoder == DEFAULT_ENCODER:
                        build_model(self.options.model_dir, progress=None)  # no-op once built
                    self._classifier = load_classifier(self.options)
                except Exception as exc:
                    self.checks["model"] = f"failed to load ({exc}); retrying at the next run"
                    raise
                # The model brings ~400,000 long-lived objects; a full collection would scan
                # them all (about 250 ms holding the GIL, so /healthz and every job stall).
                # Freezing moves them out of the collector's generations for good.
                gc.freeze()
                self.checks["model"] = ""
            return self._classifier


def run_classify(
    ctx: AppContext, jobs: ClassifyJobs, *, reclassify_all: bool = False
) -> ClassifyResult:
    """Claim pending articles → embed → classify → store with their story (→ classified)."""
    m = ctx.metrics
    classifier = jobs.classifier()

    def observe(batch: BatchStats) -> None:
        m.classify_duration.observe(batch.seconds)
        m.classify_batch_size.observe(batch.size)

    result = classify_pending(
        ctx.sessions, classifier, owner=ctx.instance_id, clock=ctx.clock,
        options=jobs.options.stage_options(), reclassify_all=reclassify_all,
        stop=ctx.stopping, on_batch=observe,
    )  # fmt: skip
    m.articles_classified.labels("true").inc(result.relevant)
    m.articles_classified.labels("false").inc(result.stored - result.relevant)
    for topic, count in result.topics.items():
        m.articles_by_topic.labels(topic).inc(count)
    for stance, count in result.stances.items():
        m.articles_by_stance.labels(stance).inc(count)
    m.articles_pending.labels("classification").set(
        count_pending(ctx.sessions, classifier.model_version)
    )
    if result.stored:
        log.info(
            "classified %d articles (%d relevant, %d new stories)",
            result.stored, result.relevant, result.stories_created,
        )  # fmt: skip
    return result


async def classify_job(ctx: AppContext, jobs: ClassifyJobs) -> None:
    await _guarded(ctx, "classify", lambda: run_classify(ctx, jobs))


async def load_model_job(ctx: AppContext, jobs: ClassifyJobs) -> None:
    """Load the classifier when the service starts, in a worker thread (not at the first batch).

    Until it is loaded ``/readyz`` answers 503 with ``model: loading``. A failure is logged and
    reported there; the classify job tries again at each run.
    """
    if ctx.stopping.is_set():
        return
    future: asyncio.Future[object] = asyncio.ensure_future(asyncio.to_thread(jobs.classifier))
    ctx.inflight.add(future)
    future.add_done_callback(ctx.inflight.discard)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        return
    except Exception as exc:  # the message names the culprit (encoder, heads, folder)
        log.error("the classifier failed to load: %s; the classify job will try again", exc)


@dataclass
class AlertJobs:
    """What the alert jobs keep between runs: the rules (reloaded on change), the jitter."""

    watcher: RulesWatcher
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_settings(cls, ctx: AppContext) -> AlertJobs:
        o = ctx.settings.alerts
        return cls(RulesWatcher(o.rules_path(), o.target_names))

    def rules(self, ctx: AppContext) -> RuleSet:
        rules = self.watcher.current()
        ctx.metrics.alert_rules.set(len(rules))
        ctx.metrics.alert_rules_reload_failing.set(1 if self.watcher.last_error else 0)
        return rules


EVALUATE_MAX_BATCHES = 20


def run_evaluate(ctx: AppContext, alerts: AlertJobs) -> EvaluationResult:
    """Claim classified articles → match the rules → add them to alert groups (→ evaluated)."""
    o = ctx.settings.alerts
    rules = alerts.rules(ctx)
    total = EvaluationResult()
    for _ in range(EVALUATE_MAX_BATCHES):
        if ctx.stopping.is_set():
            break
        batch = evaluate_batch(
            ctx.sessions, rules, owner=ctx.instance_id, now=ctx.clock(), limit=o.batch_size,
            lease=o.lease,
        )  # fmt: skip
        total.add(batch)
        if batch.articles + batch.lost_leases < o.batch_size:
            break
    with ctx.sessions() as session:
        ctx.metrics.articles_pending.labels("evaluation").set(pending_evaluation(session))
    return total


async def evaluate_job(ctx: AppContext, alerts: AlertJobs) -> None:
    await _guarded(ctx, "evaluate", lambda: run_evaluate(ctx, alerts))


def run_deliver(ctx: AppContext, alerts: AlertJobs) -> DeliverResult:
    """Flush groups whose wait is over into the outbox → send due deliveries → record outcomes."""
    o = ctx.settings.alerts
    rules = alerts.rules(ctx)
    flushed = flush_due_alerts(
        ctx.sessions, rules, o.targets, o.retry_policy(), owner=ctx.instance_id,
        now=ctx.clock(), limit=o.batch_size, lease=o.lease,
    )  # fmt: skip
    for rule, count in flushed.notified.items():
        ctx.metrics.alerts_fired.labels(rule).inc(count)
    result = asyncio.run(_send_due(ctx, alerts, rules))
    for (kind, outcome), count in result.outcomes.items():
        ctx.metrics.deliveries.labels(kind, outcome).inc(count)
    with ctx.sessions() as session:
        stats = outbox_stats(session, ctx.clock())
    ctx.metrics.dead_letters.set(stats.dead)
    ctx.metrics.oldest_pending_delivery.set(stats.oldest_pending_age)
    return result


async def _send_due(ctx: AppContext, alerts: AlertJobs, rules: RuleSet) -> DeliverResult:
    o = ctx.settings.alerts
    async with httpx.AsyncClient() as http:
        return await deliver_due(
            ctx.sessions, rules, o.notifiers(NotifierDeps(http=http, clock=ctx.clock)),
            o.retry_policy(), owner=ctx.instance_id, clock=ctx.clock, rng=alerts.rng,
            limit=o.batch_size, lease=o.lease, concurrency=o.max_concurrent_sends,
        )  # fmt: skip


async def deliver_job(ctx: AppContext, alerts: AlertJobs) -> None:
    await _guarded(ctx, "deliver", lambda: run_deliver(ctx, alerts))


async def run_collect(ctx: AppContext) -> PollResult:
    """Claim due feeds → fetch → parse → store (see collectors.feeds), then record metrics."""
    options = ctx.settings.feeds
    # Built in a thread: loading the CA certificates takes tens of ms, off the event loop.
    async with await asyncio.to_thread(make_http_client, options) as client:
        collector = FeedCollector(
            options, client=client, sessions=ctx.sessions, clock=ctx.clock, owner=ctx.instance_id
        )
        result = await collector.poll_due(stop=ctx.stopping.is_set)
    record_collect_metrics(ctx.metrics, result)
    return result


def record_collect_metrics(metrics: Metrics, result: PollResult) -> None:
    for poll in result.polls:
        metrics.feed_polls.labels(poll.outcome).inc()
        metrics.fetch_duration.observe(poll.fetch_seconds)
    metrics.entries_ingested.labels("feed", "added").inc(result.added)
    metrics.entries_ingested.labels("feed", "updated").inc(result.updated)
    metrics.feeds_unhealthy.set(result.unhealthy)
    states = result.states
    metrics.feeds_total.labels("enabled").set(sum(states.values()) - states.get("disabled", 0))
    metrics.feeds_total.labels("disabled").set(states.get("disabled", 0))
    metrics.feeds_total.labels("unhealthy").set(result.unhealthy)


async def collect_job(ctx: AppContext) -> None:
    await _guarded_async(ctx, "collect", lambda: run_collect(ctx))


async def _guarded_async(
    ctx: AppContext, stage: str, work: Callable[[], Awaitable[object]]
) -> None:
    """Run ``work`` unless shutting down; record the stage's outcome; never raise.

    The work is tracked in ``ctx.inflight`` and shielded: a scheduler shutdown cancels the job,
    not the work already under way, which the runner then lets finish within its grace period.
    """
    if ctx.stopping.is_set():
        return
    future: asyncio.Future[object] = asyncio.ensure_future(work())
    ctx.inflight.add(future)
    future.add_done_callback(ctx.inflight.discard)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        return
    except Exception:
        ctx.metrics.stage_failed(stage)
        log.exception("job failed", extra={"job": stage})
    else:
        ctx.metrics.stage_succeeded(stage)


async def _guarded(ctx: AppContext, stage: str, work: Callable[[], object]) -> None:
    """Run blocking ``work`` in a worker thread, guarded like :func:`_guarded_async`."""
    await _guarded_async(ctx, stage, lambda: asyncio.to_thread(work))


def job_specs(ctx: AppContext, checks: dict[str, str] | None = None) -> list[JobSpec]:
    """The service's jobs; ``checks`` (the readiness table) learns whether the model is loaded."""
    s = ctx.settings
    alerts = AlertJobs.from_settings(ctx)  # raises RulesError on invalid rules
    classify = ClassifyJobs(s.classifier, checks={} if checks is None else checks)
    return [
        JobSpec("seeds", seeds_job, s.scheduler.seeds_interval),
        JobSpec("collect", collect_job, s.feeds.job_interval),
        JobSpec(
            "classify",
            partial(classify_job, jobs=classify),
            s.classifier.interval,
            start=partial(load_model_job, jobs=classify),
        ),
        JobSpec("retention", retention_job, s.scheduler.retention_interval),
        JobSpec("evaluate", partial(evaluate_job, alerts=alerts), s.alerts.evaluate_interval),
        JobSpec("deliver", partial(deliver_job, alerts=alerts), s.alerts.deliver_interval),
    ]
