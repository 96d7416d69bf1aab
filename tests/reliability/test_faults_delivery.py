"""Notification targets down for a while, then up: everything delivered, once.

A real ``coalition-watch run`` subprocess polls a local feed farm, classifies the articles with
the real model, evaluates the rules and sends the alerts to a target that is first down
(connection refused), then failing (HTTP 503 / SMTP 451), then up. Counted on the receiver's
side: every delivery in the database arrived exactly once (by ``webhook-id``, by
``Message-ID``), none was lost or dead-lettered, and none arrived twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlmodel import col

from collectors.feeds import FeedOptions, add_feed
from storage import migrate
from storage.db import make_engine, session_factory, transaction
from storage.models import Alert
from tests.alerts.conftest import SmtpServer
from tests.reliability.conftest import (
    FeedFarm,
    Replica,
    Replicas,
    WebhookReceiver,
    email_target_toml,
    wait_until,
    webhook_target_toml,
)

FEEDS, ENTRIES = 4, 10
STEP_TIMEOUT = 120.0  # seconds for one phase, model loading included, on 2 shared cores
QUIET_SECONDS = 4.0  # after everything is delivered: several deliver runs that must send nothing


@dataclass
class Service:
    """One ``coalition-watch run`` on a SQLite database holding the farm's feeds."""

    engine: sa.Engine
    replicas: Replicas
    expected_articles: int

    @property
    def replica(self) -> Replica:
        return self.replicas[0]

    def scalar(self, sql: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar() or 0)

    def deliveries(self) -> list[tuple[str, str, int, str | None]]:
        """(idempotency key, status, attempts, last error) of every delivery."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT idempotency_key, status, attempts, last_error FROM delivery")
            )
            return [(str(k), str(s), int(a), e) for k, s, a, e in rows]

    def due_alerts(self) -> int:
        """Alerts whose group wait is over but that are not turned into deliveries yet (a
        group's next alert waits for its ``repeat_interval``: not due, not counted)."""
        query = (
            sa.select(sa.func.count())
            .select_from(Alert)
            .where(col(Alert.status) == "pending", col(Alert.notify_at) <= datetime.now(UTC))
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def all_evaluated(self) -> bool:
        """Every article stored and evaluated, every due alert turned into deliveries."""
        self.check_alive()
        return (
            self.scalar("SELECT count(*) FROM article") == self.expected_articles
            and self.scalar("SELECT count(*) FROM article WHERE status <> 'evaluated'") == 0
            and self.due_alerts() == 0
            and self.scalar("SELECT count(*) FROM delivery") > 0
        )

    def check_alive(self) -> None:
        if not self.replica.alive:
            raise AssertionError(f"the service exited:\n{self.replica.log_text[-4000:]}")

    def wait(self, predicate: Callable[[], object], what: str) -> None:
        try:
            wait_until(predicate, STEP_TIMEOUT, interval=0.3, what=what)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\ndeliveries: {self.deliveries()}\n{self.replica.log_text[-4000:]}"
            ) from None


@contextmanager
def service(tmp_path: Path, farm: FeedFarm, target_toml: str) -> Iterator[Service]:
    """The feeds in a fresh SQLite database, and ``coalition-watch run`` on it (started)."""
    url = f"sqlite:///{tmp_path / 'faults.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    options = FeedOptions(default_interval=3600, min_interval=3600)
    with transaction(session_factory(engine)) as session:
        for feed_url in farm.generate(FEEDS, ENTRIES):
            add_feed(session, feed_url, options, datetime.now(UTC))
    replicas = Replicas(tmp_path / "service", url, count=1, config_toml=target_toml)
    try:
        replicas.start()
        yield Service(engine, replicas, farm.expected_articles)
    finally:
        replicas.kill_all()
        engine.dispose()


def finish(svc: Service) -> None:
    """The service is still healthy, and stops cleanly on SIGTERM."""
    svc.check_alive()
    assert svc.replica.metric_sum("coalition_watch_deliveries_dead") == 0
    assert svc.replicas.stop_all() == [0]


def test_webhook_receiver_down_then_failing_then_up_gets_everything_once(
    tmp_path: Path, feed_farm: FeedFarm, webhook_receiver: WebhookReceiver
) -> None:
    receiver = webhook_receiver
    receiver.down()  # connection refused from the first attempt on
    with service(tmp_path, feed_farm, webhook_target_toml("ops-hook", receiver.url)) as svc:
        # Down: every alert is stored, queued and retried; nothing is lost or dead-lettered.
        svc.wait(svc.all_evaluated, "articles classified and evaluated, alerts queued")
        svc.wait(
            lambda: all(a >= 2 and s == "pending" for _k, s, a, _e in svc.deliveries()),
            "every delivery tried at least twice while the receiver is down",
        )
        down = svc.deliveries()
        assert receiver.hooks == []
        assert all("connection error" in (e or "") for *_x, e in down), down

        # Failing: the receiver answers 503 to every (verified) request.
        receiver.fail(503)
        keys = {k for k, *_ in down}
        svc.wait(
            lambda: keys <= {h.webhook_id for h in receiver.hooks if h.status == 503},
            "every delivery answered 503 at least once",
        )
        assert svc.scalar("SELECT count(*) FROM delivery WHERE status = 'sent'") == 0

        # Up: everything arrives, and then nothing more.
        receiver.up()
        svc.wait(
            lambda: all(s == "sent" for _k, s, _a, _e in svc.deliveries()),
            "every delivery sent once the receiver is up",
        )
        time.sleep(QUIET_SECONDS)
        rows = svc.deliveries()
        accepted = receiver.accepted_ids()
        refused = Counter(h.status for h in receiver.hooks if h.status >= 300)
        print(
            f"\nwebhook: {len(rows)} deliveries; attempts while down: "
            f"{sum(a for _k, _s, a, _e in down)}; answered 503: {refused[503]}; accepted "
            f"{sum(accepted.values())} for {len(accepted)} webhook-ids; duplicates "
            f"{len(receiver.duplicates())}; attempts per delivery "
            f"{sorted(Counter(a for _k, _s, a, _e in rows).items())}"
        )
        assert {k for k, *_ in rows} == keys  # no delivery appeared or vanished
        assert set(accepted) == keys, "lost: " + ", ".join(sorted(keys - set(accepted)))
        assert receiver.duplicates() == {}
        assert receiver.unverified() == []
        assert all(s == "sent" and a >= 3 for _k, s, a, _e in rows), rows
        assert svc.replica.metric_sum(
            "coalition_watch_deliveries_total", kind="webhook", outcome="sent"
        ) == len(keys)
        finish(svc)


def test_smtp_server_down_then_deferring_then_up_gets_every_mail_once(
    tmp_path: Path, feed_farm: FeedFarm
) -> None:
    smtp = SmtpServer()  # its port is chosen, nothing listens on it yet: connection refused
    try:
        with service(tmp_path, feed_farm, email_target_toml("desk", smtp.port)) as svc:
            svc.wait(svc.all_evaluated, "articles classified and evaluated, alerts queued")
            svc.wait(
                lambda: all(a >= 2 and s == "pending" for _k, s, a, _e in svc.deliveries()),
                "every delivery tried at least twice while the SMTP server is down",
            )
            down = svc.deliveries()
            keys = {k for k, *_ in down}
            assert all("cannot reach SMTP server" in (e or "") for *_x, e in down), down

            # Deferring: the server is up and answers DATA with a temporary failure.
            smtp.sink.reject = "451 4.3.0 Mailbox temporarily unavailable, try again later"
            smtp.start()
            svc.wait(
                lambda: all("451" in (e or "") or s == "sent" for _k, s, _a, e in svc.deliveries()),
                "every delivery deferred with 451 at least once",
            )
            assert smtp.messages == []

            # Up: every mail arrives, and then nothing more.
            smtp.sink.reject = None
            svc.wait(
                lambda: all(s == "sent" for _k, s, _a, _e in svc.deliveries()),
                "every delivery sent once the SMTP server accepts mail",
            )
            time.sleep(QUIET_SECONDS)
            rows = svc.deliveries()
            ids = Counter(str(m["Message-ID"]) for m in smtp.messages)
            expected = {f"<{k}@cw.example>" for k in keys}
            print(
                f"\nsmtp: {len(rows)} deliveries; attempts while down: "
                f"{sum(a for _k, _s, a, _e in down)}; mails received {sum(ids.values())} for "
                f"{len(ids)} Message-IDs; duplicates {sum(n - 1 for n in ids.values())}; "
                f"attempts per delivery {sorted(Counter(a for _k, _s, a, _e in rows).items())}"
            )
            assert {k for k, *_ in rows} == keys
            assert set(ids) == expected, "lost: " + ", ".join(sorted(expected - set(ids)))
            assert set(ids.values()) == {1}, {i: n for i, n in ids.items() if n > 1}
            assert all(s == "sent" and a >= 3 for _k, s, a, _e in rows), rows
            finish(svc)
    finally:
        smtp.stop()
