"""Webhooks against a real HTTP receiver on 127.0.0.1 that verifies signatures itself."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from alerts.notifiers import DeliveryError, NotifierDeps, Outgoing, parse_target
from alerts.outbox import RetryPolicy, retry_delivery
from alerts.webhook import (
    WebhookNotifier,
    WebhookVerificationError,
    parse_retry_after,
    sign,
    verify,
)
from storage.db import SessionFactory, transaction
from storage.models import Delivery
from tests.alerts.conftest import (
    SECRET,
    Clock,
    Pipeline,
    WebhookReceiver,
    add_article,
    add_story,
    receiver_verifies,
    webhook_target,
)
from tests.conftest import free_port


def the_delivery(sessions: SessionFactory) -> Delivery:
    with sessions() as s:
        [row] = s.exec(select(Delivery)).all()
        return row


async def notify_once(sessions: SessionFactory, clock: Clock, pipe: Pipeline, **kw: object) -> None:
    story = add_story(sessions, "Coalition leaders agree on a reassurance force", sources=3)
    add_article(sessions, story_id=story, **kw)  # type: ignore[arg-type]
    pipe.evaluate()
    clock.advance(minutes=2)
    assert pipe.flush().deliveries == 1


def test_standard_webhooks_reference_signature() -> None:
    # The example published with the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert (
        sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    # A plain secret is used as its UTF-8 bytes.
    headers = {"webhook-id": "m1", "webhook-timestamp": "1700000000"}
    headers["webhook-signature"] = sign("plain secret", "m1", 1700000000, b"{}")
    assert receiver_verifies("plain secret", headers, b"{}")


async def test_receiver_verifies_the_signature_and_rejects_a_tampered_body(
    sessions: SessionFactory, clock: Clock, receiver: WebhookReceiver
) -> None:
    pipe = Pipeline(sessions, clock, [webhook_target("hook", receiver.url)])
    await notify_once(sessions, clock, pipe, title="Leaders <b>agree</b>", outlet="ANSA")
    result = await pipe.deliver()
    assert result.count("sent") == 1
    [got] = receiver.received
    assert got.verified and got.status == 200
    h = got.headers
    assert h["content-type"] == "application/json"
    assert h["webhook-id"] == the_delivery(sessions).idempotency_key
    assert int(h["webhook-timestamp"]) == int(clock().timestamp())
    assert h["webhook-signature"].startswith("v1,")
    # Our verify() agrees with the receiver's own check, and both refuse a changed body.
    verify(SECRET, h, got.body, now=clock())
    tampered = got.body.replace(b"ANSA", b"RT")
    assert not receiver_verifies(SECRET, h, tampered)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, h, tampered, now=clock())
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, h, got.body, now=clock() + timedelta(minutes=10))  # replayed late
    forwarded = {k: v for k, v in h.items() if k.startswith("webhook-")}
    replay = httpx.post(receiver.url, content=tampered, headers=forwarded, timeout=5)
    assert replay.status_code == 401
    # The documented body.
    body = got.json
    assert set(body) == {
        "id", "type", "version", "alert_id", "rule", "rule_description", "severity",
        "group_key", "fired_at", "notified_at", "story", "articles",
    }  # fmt: skip
    assert body["id"] == h["webhook-id"] and body["type"] == "alert.fired"
    assert body["severity"] == "warning" and body["rule"] == "coalition"
    assert body["story"]["title"] == "Coalition leaders agree on a reassurance force"
    assert body["story"]["source_count"] == 3
    [article] = body["articles"]
    assert article["title"] == "Leaders <b>agree</b>" and article["outlet"] == "ANSA"
    assert set(article) == {
        "id", "title", "url", "outlet", "published_at", "language", "story_id", "relevant",
        "relevance_confidence", "topics", "stance", "stance_confidence", "evidence",
    }  # fmt: skip
    assert article["topics"] == [
        {"name": "reassurance_force", "confidence": 0.93},
        {"name": "security_guarantees", "confidence": 0.81},
    ]
    assert article["stance"] == "supportive" and article["stance_confidence"] == 0.8
    assert article["relevance_confidence"] == 0.97
    assert "reassurance force" in article["evidence"]  # the paragraph with the hits
    assert body["fired_at"].endswith("Z") and article["published_at"].endswith("Z")


async def test_500_three_times_then_200_gives_one_success_with_one_webhook_id(
    sessions: SessionFactory, clock: Clock
) -> None:
    receiver = WebhookReceiver(script=[500, 500, 503])
    try:
        pipe = Pipeline(sessions, clock, [webhook_target("hook", receiver.url)])
        await notify_once(sessions, clock, pipe)
        delays = []
        for attempt in range(1, 4):
            result = await pipe.deliver()
            assert result.count("retry") == 1
            row = the_delivery(sessions)
            assert row.status == "pending" and row.attempts == attempt
            assert row.last_error is not None and row.last_error.startswith("HTTP 50")
            delay = (row.next_attempt_at - clock()).total_seconds()
            delays.append(delay)
            assert (await pipe.deliver()).count("retry") == 0  # not due yet: nothing sent
            clock.advance(seconds=delay)
        result = await pipe.deliver()
        assert result.count("sent") == 1
        row = the_delivery(sessions)
        assert row.status == "sent" and row.attempts == 4 and row.last_error is None
        assert [r.status for r in receiver.received] == [500, 500, 503, 200]
        assert len(receiver.accepted) == 1
        assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
        assert all(r.verified for r in receiver.received)
        # Exponential backoff from 30 s, with up to 20 % jitter taken off.
        for delay, base in zip(delays, (30, 60, 120), strict=True):
            assert base * 0.8 <= delay <= base
        clock.advance(hours=2)
        assert (await pipe.deliver()).count("sent") == 0
        assert len(receiver.received) == 4
    finally:
        receiver.close()


async def test_a_400_dead_letters_at_once_and_retry_revives_it(
    sessions: SessionFactory, clock: Clock
) -> None:
    receiver = WebhookReceiver(script=[400])
    try:
        pipe = Pipeline(sessions, clock, [webhook_target("hook", receiver.url)])
        await notify_once(sessions, clock, pipe)
        result = await pipe.deliver()
        assert result.outcomes == {("webhook", "dead"): 1}
        row = the_delivery(sessions)
        assert row.status == "dead" and row.attempts == 1
        assert row.last_error == "permanent error: HTTP 400: ok"
        clock.advance(hours=1)
        assert (await pipe.deliver()).outcomes == {}
        with transaction(sessions) as s:
            assert row.id is not None
            retry_delivery(s, row.id, clock(), timedelta(hours=24))
        assert (await pipe.deliver()).count("sent") == 1
        assert the_delivery(sessions).status == "sent"
        assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    finally:
        receiver.close()


async def test_429_retry_after_is_honoured_and_timeouts_retry(
    sessions: SessionFactory, clock: Clock
) -> None:
    receiver = WebhookReceiver(script=[(429, {"Retry-After": "900"}), ("sleep", 1.5)])
    try:
        target = webhook_target("hook", receiver.url, timeout="0.5s")
        pipe = Pipeline(sessions, clock, [target])
        await notify_once(sessions, clock, pipe)
        await pipe.deliver()
        row = the_delivery(sessions)
        assert row.next_attempt_at == clock() + timedelta(seconds=900)
        assert row.last_error is not None and row.last_error.startswith("HTTP 429")
        clock.advance(seconds=900)
        await pipe.deliver()
        row = the_delivery(sessions)
        assert row.status == "pending" and row.attempts == 2
        assert row.last_error is not None and row.last_error.startswith("timed out after 0.5s")
        clock.advance(hours=1)
        assert (await pipe.deliver()).count("sent") == 1
    finally:
        receiver.close()


async def test_connection_errors_retry_until_max_age_then_dead_letter(
    sessions: SessionFactory, clock: Clock
) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    pipe = Pipeline(sessions, clock, [webhook_target("hook", url)])
    pipe.policy = RetryPolicy(max_age=timedelta(hours=3))
    await notify_once(sessions, clock, pipe)
    created = clock()
    attempts = 0
    while the_delivery(sessions).status == "pending" and attempts < 50:
        await pipe.deliver()
        attempts += 1
        row = the_delivery(sessions)
        if row.status == "pending":
            assert row.last_error is not None and "connection error" in row.last_error
            assert row.next_attempt_at <= created + timedelta(hours=3)
            clock.now = row.next_attempt_at
    row = the_delivery(sessions)
    assert row.status == "dead"
    assert row.last_error is not None and row.last_error.startswith(
        f"gave up after {row.attempts} attempts over 3.0h: connection error"
    )
    # 30 s doubling (minus jitter) to a 1 h cap fits about nine attempts in three hours.
    assert 7 <= row.attempts <= 11


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after("Tue, 06 Jan 2026 12:05:00 GMT", now) == 300
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_bad_webhook_targets_fail_at_load_with_their_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"target 'ops': .*exactly one of secret or secret_file"):
        parse_target({"name": "ops", "kind": "webhook", "url": "https://x.example"}, 0)
    with pytest.raises(ValueError, match=r"target 'ops': url: .*http:// or https://"):
        parse_target({"name": "ops", "kind": "webhook", "url": "ftp://x", "secret": "s"}, 0)
    with pytest.raises(
        ValueError, match=r"target 'ops': headers: .*cannot be overridden: Webhook-Id"
    ):
        parse_target(
            {"name": "ops", "kind": "webhook", "url": "https://x.example", "secret": "s",
             "headers": {"Webhook-Id": "x"}}, 0,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"target 'ops': tiemout: unknown option"):
        parse_target(
            {"name": "ops", "kind": "webhook", "url": "https://x.example", "secret": "s",
             "tiemout": 3}, 0,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"targets\[2\]: unknown kind 'slack'"):
        parse_target({"kind": "slack"}, 2)
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    target = parse_target(
        {"name": "ops", "kind": "webhook", "url": "https://x.example",
         "secret_file": str(secret_file)}, 0,
    )  # fmt: skip
    assert target.signing_secret == SECRET  # type: ignore[attr-defined]


async def test_extra_headers_are_sent_and_redirects_are_permanent(
    sessions: SessionFactory, clock: Clock
) -> None:
    receiver = WebhookReceiver(script=[(302, {"Location": "https://elsewhere.example/"})])
    try:
        target = webhook_target("hook", receiver.url, headers={"X-Team": "desk"})
        notifier = WebhookNotifier(target, NotifierDeps(clock=clock))
        with pytest.raises(DeliveryError) as info:
            from alerts.notification import Notification

            note = Notification(
                id="k1", type="alert.test", alert_id=None, rule="r", rule_description="",
                severity="info", group_key="g", fired_at=clock(), notified_at=clock(),
                story=None,
            )  # fmt: skip
            await notifier.send(Outgoing("k1", [note]))
        assert info.value.permanent and "redirect to https://elsewhere.example/" in str(info.value)
        assert receiver.received[0].headers["x-team"] == "desk"
    finally:
        receiver.close()
