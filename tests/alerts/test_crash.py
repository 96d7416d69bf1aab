"""Crashes lose nothing and double nothing: a SIGKILLed service, a worker dying mid-send."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import col, select

from alerts.notifiers import NotifierDeps, build_notifier
from alerts.outbox import deliver_due
from storage.claims import claim
from storage.db import SessionFactory, make_engine, session_factory
from storage.models import Alert, Delivery
from tests.alerts.conftest import (
    Clock,
    Pipeline,
    SmtpServer,
    WebhookReceiver,
    add_article,
    add_story,
    targets_toml,
    wait_for,
    webhook_target,
)
from tests.conftest import ServiceProcess


async def test_a_worker_dying_mid_send_is_taken_over_after_its_lease(
    sessions: SessionFactory, clock: Clock, receiver: WebhookReceiver
) -> None:
    pipe = Pipeline(sessions, clock, [webhook_target("hook", receiver.url)])
    add_article(sessions, story_id=add_story(sessions, "s"))
    pipe.evaluate()
    clock.advance(minutes=2)
    pipe.flush()
    # Worker A claims the delivery, then dies before sending or recording anything.
    claimed = claim(
        sessions, Delivery, where=[col(Delivery.status) == "pending"], order_by=[Delivery.id],
        limit=10, owner="worker-a", lease=timedelta(minutes=5), now=clock(),
    )  # fmt: skip
    assert len(claimed) == 1
    # Worker B, a fresh process: nothing while A's lease holds, then it delivers, once.
    rules = pipe.rules
    async with httpx.AsyncClient() as http:
        notifiers = {"hook": build_notifier(pipe.targets[0], NotifierDeps(http, clock))}

        async def worker_b() -> int:
            result = await deliver_due(
                sessions, rules, notifiers, pipe.policy, owner="worker-b", clock=clock
            )
            return result.count("sent")

        assert await worker_b() == 0
        clock.advance(minutes=5, seconds=1)
        assert await worker_b() == 1
        clock.advance(hours=1)
        assert await worker_b() == 0
    assert len(receiver.received) == 1
    with sessions() as s:
        [row] = s.exec(select(Delivery)).all()
    assert row.status == "sent" and row.attempts == 1 and row.claimed_by is None


def _metric(base: str, name: str, **labels: str) -> float:
    body = httpx.get(base + "/metrics", timeout=5).text
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_service_killed_after_the_alert_is_stored_delivers_it_once_after_restart(
    service: ServiceProcess, tmp_path: Path
) -> None:
    receiver = WebhookReceiver()
    smtp = SmtpServer()
    smtp.start()
    try:
        _killed_then_restarted(service, tmp_path, receiver, smtp)
    finally:
        service.kill()
        receiver.close()
        smtp.stop()


def _killed_then_restarted(
    service: ServiceProcess, tmp_path: Path, receiver: WebhookReceiver, smtp: SmtpServer
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: e2e\n"
        "    match: {relevant: true, topics_any: [reassurance_force], new_story: true}\n"
        "    group_wait: 0s\n",
        encoding="utf-8",
    )
    config = tmp_path / "cw.toml"
    config.write_text(
        f"""
[alerts]
rules = "{rules}"
evaluate_interval = 0.2
deliver_interval = 3600   # the first run only: nothing is flushed or sent before the kill

"""
        + targets_toml(receiver.url, smtp.port),
        encoding="utf-8",
    )
    empty_seeds = tmp_path / "no-seeds"
    empty_seeds.mkdir()
    service.env.update(
        COALITION_WATCH_CONFIG=str(config), COALITION_WATCH_SEEDS_DIR=str(empty_seeds)
    )
    service.cli("db", "upgrade")
    engine = make_engine(service.env["COALITION_WATCH_DATABASE_URL"])
    sessions = session_factory(engine)
    try:
        service.start()
        service.wait_http("/healthz")
        assert wait_for(
            lambda: _metric(service.base, "coalition_watch_stage_runs_total", stage="deliver") >= 1,
            timeout=30,
        )
        # An article arrives after the first deliver run: evaluation stores its alert.
        add_article(sessions, story_id=add_story(sessions, "Coalition agrees"), title="First")

        def alert_stored() -> bool:
            with sessions() as s:
                return s.exec(select(Alert)).first() is not None

        assert wait_for(alert_stored, timeout=30), service.log.read_text()
        service.kill()  # SIGKILL: no shutdown, no cleanup
        with sessions() as s:
            [alert] = s.exec(select(Alert)).all()
            assert alert.status == "pending"
            assert s.exec(select(Delivery)).all() == []
        assert receiver.received == [] and smtp.messages == []

        # Restart, now delivering every 0.3 s: the stored alert goes out, once per target.
        service.env["COALITION_WATCH_ALERTS__DELIVER_INTERVAL"] = "0.3"
        restarted = time.monotonic()
        service.start()
        assert wait_for(lambda: receiver.accepted and smtp.messages, timeout=30), (
            service.log.read_text()
        )
        recovery = time.monotonic() - restarted
        time.sleep(1.5)  # several more deliver runs: still once
        assert len(receiver.received) == 1 and len(smtp.messages) == 1
        assert receiver.accepted[0].json["articles"][0]["title"] == "First"
        with sessions() as s:
            rows = s.exec(select(Delivery)).all()
        assert sorted((d.target, d.status, d.attempts) for d in rows) == [
            ("desk", "sent", 1), ("hook", "sent", 1),
        ]  # fmt: skip

        # While it runs: a new story's article → webhook and email, timed.
        started = time.monotonic()
        add_article(sessions, story_id=add_story(sessions, "Another development"), title="Second")
        assert wait_for(lambda: len(receiver.accepted) == 2, timeout=30)
        to_webhook = time.monotonic() - started
        assert wait_for(lambda: len(smtp.messages) == 2, timeout=30)
        to_email = time.monotonic() - started
        print(
            f"\nrecovery after restart: {recovery:.2f}s; classified article → webhook "
            f"{to_webhook:.2f}s, → email {to_email:.2f}s (evaluate 0.2s, deliver 0.3s, "
            "group_wait 0s)"
        )
        assert to_webhook < 15 and to_email < 15
        # This process notified both alerts (the first one stored by the killed process).
        assert _metric(service.base, "coalition_watch_alerts_total", rule="e2e") == 2
        assert (
            _metric(
                service.base, "coalition_watch_deliveries_total", kind="webhook", outcome="sent"
            )
            == 2
        )
        assert _metric(service.base, "coalition_watch_deliveries_dead") == 0
        assert service.stop() == 0
    finally:
        engine.dispose()
