"""The outbox: pending alerts become deliveries; deliveries are sent, retried or dead-lettered.

``flush_due_alerts``: an alert whose ``group_wait`` has passed gets one ``Delivery`` row per
target, in the transaction that marks it ``notified`` (or ``silenced``, when a silence now
covers it). Nothing is sent there: a crash after the commit leaves rows that the next
``deliver_due`` sends; a crash before it leaves the alert pending.

``deliver_due``: claim due deliveries (with a lease), send, record each outcome. A failure is
retried with exponential backoff and jitter (``retry.initial`` doubling up to ``retry.max``,
or later when the target sent ``Retry-After``); a permanent error, or a failure past the
delivery's deadline (``retry.max_age`` after creation), dead-letters it with the reason.
Delivery is at least once: a crash between a send and its record resends it after the lease,
with the same ``webhook-id`` / ``Message-ID``, so receivers can drop the repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from alerts.notification import Notification, load_notification
from alerts.notifiers import DeliveryError, Notifier, Outgoing, TargetOptions
from alerts.rules import RuleSet
from alerts.silences import active_silence
from storage.claims import claim, release, still_owned
from storage.db import SessionFactory, begin_write, transaction
from storage.models import Alert, Delivery

log = logging.getLogger(__name__)

SENT, RETRY, DEAD = "sent", "retry", "dead"


@dataclass(frozen=True)
class RetryPolicy:
    initial: timedelta = timedelta(seconds=30)
    max: timedelta = timedelta(hours=1)
    max_age: timedelta = timedelta(hours=24)
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random) -> timedelta:
        """Backoff after the ``attempts``-th failure: initial·2^(n-1), capped, minus jitter."""
        exponent = min(max(attempts - 1, 0), 32)
        base = min(self.max.total_seconds(), self.initial.total_seconds() * 2**exponent)
        return timedelta(seconds=base * (1.0 - self.jitter * rng.random()))


# --- flush: pending alert → delivery rows --------------------------------------------------


@dataclass
class FlushResult:
    notified: Counter[str] = field(default_factory=Counter)  # rule -> alerts notified
    silenced: Counter[str] = field(default_factory=Counter)
    deliveries: int = 0


def delivery_key(alert: Alert, target: str) -> str:
    """The idempotency key: stable for this alert and target, unique across databases."""
    seed = f"{alert.id}|{alert.rule}|{alert.group_key}|{alert.fired_at.isoformat()}|{target}"
    return f"cw-{alert.id}-{target}-{hashlib.sha256(seed.encode()).hexdigest()[:10]}"


def digest_window(now: datetime, seconds: float) -> tuple[datetime, datetime]:
    """The digest window containing ``now`` (windows are aligned to the Unix epoch)."""
    start_ts = (now.timestamp() // seconds) * seconds
    start = datetime.fromtimestamp(start_ts, UTC)
    return start, start + timedelta(seconds=seconds)


def flush_due_alerts(
    sessions: SessionFactory,
    rules: RuleSet,
    targets: Sequence[TargetOptions],
    policy: RetryPolicy,
    *,
    owner: str,
    now: datetime,
    limit: int = 100,
    lease: timedelta = timedelta(minutes=5),
) -> FlushResult:
    claimed = claim(
        sessions, Alert,
        where=[col(Alert.status) == "pending", col(Alert.notify_at) <= now],
        order_by=[col(Alert.notify_at), col(Alert.id)],
        limit=limit, owner=owner, lease=lease, now=now,
    )  # fmt: skip
    result = FlushResult()
    by_name = {t.name: t for t in targets}
    for row in claimed:
        assert row.id is not None
        with transaction(sessions) as session:
            begin_write(session)  # SQLite: no article joins the alert while it is flushed
            alert = still_owned(session, Alert, row.id, owner)
            if alert is None or alert.status != "pending":
                continue
            created = _flush_one(session, alert, rules, by_name, policy, now)
            if created is None:
                result.silenced[alert.rule] += 1
            else:
                result.notified[alert.rule] += 1
                result.deliveries += created
    return result


def _flush_one(
    session: Session,
    alert: Alert,
    rules: RuleSet,
    targets: Mapping[str, TargetOptions],
    policy: RetryPolicy,
    now: datetime,
) -> int | None:
    """Deliveries created for ``alert``, or None when a silence holds it."""
    alert.open_key = None
    release(alert)
    silence = active_silence(session, alert.rule, alert.story_id, now)
    if silence is not None:
        alert.status = "silenced"
        alert.silence_id = silence.id
        session.add(alert)
        log.info("alert silenced", extra={"alert_id": alert.id, "rule": alert.rule})
        return None
    rule = rules.get(alert.rule)
    if rule is None:
        log.warning("rule no longer configured: notifying every target", extra={"rule": alert.rule})
        names = list(targets)
    else:
        names = rule.target_names(list(targets))
    assert alert.id is not None
    created = 0
    for name in names:
        target = targets.get(name)
        if target is None:
            log.error("rule names an unknown target", extra={"rule": alert.rule, "target": name})
            continue
        first = now
        window = target.digest_window_seconds()
        if window:
            first = digest_window(now, window)[1]
        session.add(
            Delivery(
                alert_id=alert.id, target=name, target_kind=target.kind, status="pending",
                attempts=0, next_attempt_at=first, idempotency_key=delivery_key(alert, name),
                created_at=now, expires_at=first + policy.max_age,
            )
        )  # fmt: skip
        created += 1
    alert.status = "notified"
    alert.notified_at = now
    session.add(alert)
    return created


# --- deliver: send due deliveries -----------------------------------------------------------


@dataclass
class DeliverResult:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, outcome)
    lost_leases: int = 0

    def count(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)


@dataclass(frozen=True)
class _Attempt:
    ok: bool
    detail: str
    permanent: bool = False
    retry_after: float | None = None


def _batches(rows: Sequence[Delivery], notifiers: Mapping[str, Notifier]) -> list[list[Delivery]]:
    """One batch per message: a digest target's rows of one window go together."""
    singles: list[list[Delivery]] = []
    digests: dict[tuple[str, datetime], list[Delivery]] = {}
    for row in rows:
        notifier = notifiers.get(row.target)
        window = notifier.options.digest_window_seconds() if notifier is not None else None
        if window:
            digests.setdefault((row.target, digest_window(row.created_at, window)[0]), []).append(
                row
            )
        else:
            singles.append([row])
    return singles + list(digests.values())


def _outgoing(
    sessions: SessionFactory, batch: Sequence[Delivery], rules: RuleSet, window: float | None
) -> Outgoing:
    with sessions() as session:
        notifications: list[Notification] = []
        for row in batch:
            alert = session.get(Alert, row.alert_id)
            if alert is None:
                raise DeliveryError(f"alert {row.alert_id} no longer exists", permanent=True)
            notifications.append(
                load_notification(session, alert, row.idempotency_key, rules.get(alert.rule))
            )
    if window is None:
        return Outgoing(batch[0].idempotency_key, notifications)
    start, end = digest_window(batch[0].created_at, window)
    ids = ",".join(str(r.id) for r in sorted(batch, key=lambda r: r.id or 0))
    tag = hashlib.sha256(ids.encode()).hexdigest()[:8]
    key = f"cw-digest-{batch[0].target}-{start:%Y%m%dT%H%M}-{tag}"
    return Outgoing(key, notifications, digest_window=(start, end))


async def deliver_due(
    sessions: SessionFactory,
    rules: RuleSet,
    notifiers: Mapping[str, Notifier],
    policy: RetryPolicy,
    *,
    owner: str,
    clock: Callable[[], datetime],
    rng: random.Random | None = None,
    limit: int = 100,
    lease: timedelta = timedelta(minutes=5),
    concurrency: int = 8,
) -> DeliverResult:
    """Claim due deliveries, send them (``concurrency`` at a time), record every outcome."""
    rng = rng or random.Random()
    now = clock()
    claimed = await asyncio.to_thread(
        claim, sessions, Delivery,
        where=[col(Delivery.status) == "pending", col(Delivery.next_attempt_at) <= now],
        order_by=[col(Delivery.next_attempt_at), col(Delivery.id)],
        limit=limit, owner=owner, lease=lease, now=now,
    )  # fmt: skip
    result = DeliverResult()
    gate = asyncio.Semaphore(concurrency)
    # Outcomes are written one at a time: concurrent SQLite writers would wait on each other
    # with the driver's sleeping busy handler, which costs far more than queueing here.
    writer = asyncio.Lock()

    async def attempt(batch: list[Delivery]) -> None:
        async with gate:
            outcome = await _send(sessions, batch, rules, notifiers)
        async with writer:
            await asyncio.to_thread(
                _record, sessions, batch, outcome, policy, owner, clock(), rng, result
            )

    await asyncio.gather(*(attempt(b) for b in _batches(claimed, notifiers)))
    return result


async def _send(
    sessions: SessionFactory,
    batch: list[Delivery],
    rules: RuleSet,
    notifiers: Mapping[str, Notifier],
) -> _Attempt:
    target = batch[0].target
    notifier = notifiers.get(target)
    if notifier is None:
        return _Attempt(False, f"target {target!r} is no longer configured", permanent=True)
    try:
        window = notifier.options.digest_window_seconds()
        message = await asyncio.to_thread(_outgoing, sessions, batch, rules, window)
        receipt = await notifier.send(message)
    except DeliveryError as exc:
        return _Attempt(False, str(exc), exc.permanent, exc.retry_after)
    except Exception as exc:  # a bug or an unexpected library error: retried, and logged
        log.exception("delivery failed unexpectedly", extra={"target": target})
        return _Attempt(False, f"{type(exc).__name__}: {exc}")
    return _Attempt(True, receipt)


def _record(
    sessions: SessionFactory,
    batch: Sequence[Delivery],
    outcome: _Attempt,
    policy: RetryPolicy,
    owner: str,
    now: datetime,
    rng: random.Random,
    result: DeliverResult,
) -> None:
    with transaction(sessions) as session:
        begin_write(session)
        for claimed in batch:
            assert claimed.id is not None
            row = still_owned(session, Delivery, claimed.id, owner)
            if row is None:
                result.lost_leases += 1
                continue
            row.attempts += 1
            release(row)
            verdict = _apply(row, outcome, policy, now, rng)
            session.add(row)
            result.outcomes[(row.target_kind, verdict)] += 1
            extra = {"delivery_id": row.id, "alert_id": row.alert_id, "target": row.target}
            if verdict == SENT:
                log.info("delivered (%s)", outcome.detail, extra=extra)
            elif verdict == RETRY:
                log.warning(
                    "delivery attempt %d failed, next at %s: %s",
                    row.attempts, row.next_attempt_at.isoformat(), outcome.detail, extra=extra,
                )  # fmt: skip
            else:
                log.error("delivery dead-lettered: %s", row.last_error, extra=extra)


def _apply(
    row: Delivery, outcome: _Attempt, policy: RetryPolicy, now: datetime, rng: random.Random
) -> str:
    if outcome.ok:
        row.status = SENT
        row.sent_at = now
        row.last_error = None
        return SENT
    deadline = row.expires_at or (row.created_at + policy.max_age)
    if outcome.permanent:
        row.status = DEAD
        row.last_error = f"permanent error: {outcome.detail}"
        return DEAD
    if now >= deadline:
        row.status = DEAD
        age = now - row.created_at
        row.last_error = (
            f"gave up after {row.attempts} attempts over {_human(age)}: {outcome.detail}"
        )
        return DEAD
    delay = policy.delay(row.attempts, rng)
    if outcome.retry_after is not None:
        delay = max(delay, timedelta(seconds=outcome.retry_after))
    row.next_attempt_at = min(now + delay, deadline)
    row.last_error = outcome.detail
    return RETRY


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


# --- operator actions and statistics --------------------------------------------------------


def retry_delivery(
    session: Session, delivery_id: int, now: datetime, max_age: timedelta
) -> Delivery | None:
    """Send a delivery again as soon as possible, with a fresh deadline (``alerts retry``)."""
    begin_write(session)
    row = session.get(Delivery, delivery_id)
    if row is None:
        return None
    row.status = "pending"
    row.next_attempt_at = now
    row.expires_at = now + max_age
    release(row)
    session.add(row)
    return row


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    dead: int
    oldest_pending_age: float  # seconds; 0 when nothing is pending


def outbox_stats(session: Session, now: datetime) -> OutboxStats:
    d: Any = Delivery
    pending, oldest = session.execute(
        sa.select(sa.func.count(), sa.func.min(d.created_at))
        .select_from(Delivery)
        .where(d.status == "pending")
    ).one()
    dead = (
        session.execute(
            sa.select(sa.func.count()).select_from(Delivery).where(d.status == DEAD)
        ).scalar()
        or 0
    )
    age = 0.0
    if oldest is not None:
        if oldest.tzinfo is None:  # aggregates bypass the column type on SQLite
            oldest = datetime.fromisoformat(str(oldest)).replace(tzinfo=UTC)
        age = max(0.0, (now - oldest).total_seconds())
    return OutboxStats(int(pending or 0), int(dead), age)
