"""``coalition-watch alerts …`` commands, on a real database and real receivers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import select
from typer.testing import CliRunner

from service.cli import app
from storage.db import SessionFactory, transaction
from storage.models import Alert, Article, Delivery, Silence
from tests.alerts.conftest import (
    RULES,
    SmtpServer,
    WebhookReceiver,
    add_article,
    add_story,
    targets_toml,
)

runner = CliRunner()


@pytest.fixture
def env(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch, smtp: SmtpServer
) -> Iterator[WebhookReceiver]:
    for key in list(os.environ):
        if key.startswith("COALITION_WATCH_"):
            monkeypatch.delenv(key)
    receiver = WebhookReceiver(script=[400])
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    config = tmp_path / "cw.toml"
    config.write_text(
        f"""
database_url = "{db_url}"
[alerts]
rules = "{rules}"
"""
        + targets_toml(receiver.url, smtp.port),
        encoding="utf-8",
    )
    monkeypatch.setenv("COALITION_WATCH_CONFIG", str(config))
    monkeypatch.setenv("COALITION_WATCH_LOG__LEVEL", "WARNING")
    yield receiver
    receiver.close()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_silence_list_and_expire(env: WebhookReceiver, sessions: SessionFactory) -> None:
    code, out = cli("alerts", "silence", "--rule", "coalition", "--for", "6h", "--story", "12",
                    "--comment", "covered already")  # fmt: skip
    assert code == 0, out
    assert out.startswith("silence 1: story 12 of rule coalition until ")
    with sessions() as s:
        [silence] = s.exec(select(Silence)).all()
    assert silence.story_id == 12 and silence.comment == "covered already"
    assert silence.ends_at - silence.starts_at == timedelta(hours=6)
    code, out = cli("alerts", "silences")
    assert code == 0 and "active" in out and "coalition  story 12" in out
    assert "covered already" in out
    assert cli("alerts", "expire", "1")[0] == 0
    assert cli("alerts", "silences")[1].strip() == "no active silences"
    assert "expired" in cli("alerts", "silences", "--all")[1]
    assert cli("alerts", "expire", "99")[0] == 1
    code, out = cli("alerts", "silence", "--rule", "coalitoin", "--for", "1h")
    assert code == 1 and "unknown rule 'coalitoin'" in out
    code, out = cli("alerts", "silence", "--rule", "coalition", "--for", "a while")
    assert code == 1 and "invalid duration" in out


def test_test_notify_reports_success_and_failure(env: WebhookReceiver, smtp: SmtpServer) -> None:
    code, out = cli("alerts", "test-notify", "desk")
    assert code == 0, out
    assert "desk (email): ok, sent to 1 recipient(s) in " in out
    [msg] = smtp.messages
    assert "TEST" in str(msg["Subject"]) and "test-notify" in str(msg["Subject"])
    code, out = cli("alerts", "test-notify", "hook")  # the receiver answers 400 first
    assert code == 1 and "hook (webhook): permanent error: HTTP 400" in out
    code, out = cli("alerts", "test-notify", "hook")
    assert code == 0 and "hook (webhook): ok, HTTP 200" in out
    assert env.received[-1].json["type"] == "alert.test" and env.received[-1].verified
    code, out = cli("alerts", "test-notify", "pager")
    assert code == 1 and "unknown target 'pager' (targets: hook, desk)" in out


def test_deliveries_failed_and_retry(env: WebhookReceiver, sessions: SessionFactory) -> None:
    now = datetime.now(UTC)
    with transaction(sessions) as s:
        alert = Alert(rule="coalition", group_key="story=1", status="notified", notified_at=now)
        s.add(alert)
        s.flush()
        assert alert.id is not None
        s.add(
            Delivery(
                alert_id=alert.id, target="hook", target_kind="webhook", status="dead",
                attempts=1, last_error="permanent error: HTTP 400", idempotency_key="k1",
                next_attempt_at=now,
            )
        )  # fmt: skip
        s.add(
            Delivery(
                alert_id=alert.id, target="desk", target_kind="email", status="sent",
                attempts=1, idempotency_key="k2", next_attempt_at=now, sent_at=now,
            )
        )  # fmt: skip
    code, out = cli("alerts", "deliveries")
    assert code == 0 and "dead    hook (webhook)" in out and "sent    desk (email)" in out
    code, out = cli("alerts", "deliveries", "--failed")
    assert "hook (webhook)" in out and "desk" not in out
    assert "last error: permanent error: HTTP 400" in out
    listed = json.loads(cli("alerts", "deliveries", "--json")[1])
    assert {d["status"] for d in listed} == {"dead", "sent"}
    code, out = cli("alerts", "retry", "1")
    assert code == 0, out
    with sessions() as s:
        row = s.get(Delivery, 1)
    assert row is not None and row.status == "pending" and row.expires_at is not None
    assert row.expires_at > datetime.now(UTC) + timedelta(hours=23)
    assert cli("alerts", "retry", "42")[0] == 1


def test_backtest_prints_what_would_have_fired_and_writes_nothing(
    env: WebhookReceiver, sessions: SessionFactory, tmp_path: Path
) -> None:
    t0 = datetime(2026, 1, 6, 8, 0, tzinfo=UTC)
    a = add_story(sessions, "Story A", sources=2)
    b = add_story(sessions, "Story B")
    add_article(sessions, story_id=a, title="A1", fetched_at=t0)
    add_article(sessions, story_id=a, title="A2", fetched_at=t0 + timedelta(minutes=1))
    add_article(sessions, story_id=a, title="A3", fetched_at=t0 + timedelta(hours=3))
    add_article(sessions, story_id=b, title="B1", fetched_at=t0 + timedelta(hours=1))
    add_article(sessions, title="Football", relevant=False, relevance_score=0.02,
                topics={"off_topic": 0.99}, fetched_at=t0 + timedelta(hours=2))  # fmt: skip
    add_article(sessions, title="Old", story_id=b, fetched_at=t0 - timedelta(days=30))
    with sessions() as s:
        before = sorted(s.exec(select(Article.id, Article.status)).all())

    code, out = cli("alerts", "backtest", "--since", "2026-01-01")
    assert code == 0, out
    assert "over 5 classified articles since 2026-01-01" in out
    assert "coalition: 4 matching article(s) → 3 notification(s)" in out
    lines = out.splitlines()
    assert "  2026-01-06 08:02:00  story 1: 2 article(s)" in lines  # A1+A2 in group_wait
    assert "  2026-01-06 09:02:00  story 2: 1 article(s)" in lines  # B1's own 2m wait
    report = json.loads(cli("alerts", "backtest", "--since", "2026-01-01", "--json")[1])
    fires = report["rules"]["coalition"]["notifications"]
    assert [(f["story_id"], f["titles"], f["notify_at"]) for f in fires] == [
        (a, ["A1", "A2"], "2026-01-06T08:02:00+00:00"),
        (b, ["B1"], "2026-01-06T09:02:00+00:00"),
        (a, ["A3"], "2026-01-06T14:02:00+00:00"),  # held by the 6h repeat_interval
    ]
    # Another rules file, and the whole history (the 30-day-old article too).
    other = tmp_path / "new-stories.yaml"
    other.write_text(
        "rules:\n  - name: firsts\n    match: {relevant: true, new_story: true}\n", "utf-8"
    )
    report = json.loads(cli("alerts", "backtest", "--rules", str(other), "--json")[1])
    firsts = report["rules"]["firsts"]
    assert report["articles"] == 6 and firsts["matched"] == 2  # A1 and B1 (lowest ids)
    # Nothing written, nothing sent.
    with sessions() as s:
        assert sorted(s.exec(select(Article.id, Article.status)).all()) == before
        assert s.execute(sa.select(sa.func.count()).select_from(Alert)).scalar() == 0
        assert s.execute(sa.select(sa.func.count()).select_from(Delivery)).scalar() == 0
    assert env.received == []
    code, out = cli("alerts", "backtest", "--since", "yesterday")
    assert code == 1 and "not a date" in out
