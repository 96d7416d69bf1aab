"""Evaluation, grouping and silences on stored records, with an injected clock."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from alerts.evaluate import evaluate_batch
from alerts.silences import create_silence
from storage import migrate
from storage.db import SessionFactory, make_engine, session_factory, transaction
from storage.models import Alert, Article, ArticleStatus, Delivery
from tests.alerts.conftest import (
    Clock,
    Pipeline,
    WebhookReceiver,
    add_article,
    add_story,
    email_target,
    webhook_target,
)


def alerts(sessions: SessionFactory) -> list[Alert]:
    with sessions() as s:
        return list(s.exec(select(Alert).order_by(col(Alert.id))).all())


def deliveries(sessions: SessionFactory) -> list[Delivery]:
    with sessions() as s:
        return list(s.exec(select(Delivery).order_by(col(Delivery.id))).all())


@pytest.fixture
def pipe(sessions: SessionFactory, clock: Clock) -> Pipeline:
    targets = [webhook_target("hook", "http://127.0.0.1:9/unused"), email_target("mail", 9)]
    return Pipeline(sessions, clock, targets)


async def test_ten_articles_of_one_story_in_group_wait_make_one_notification(
    sessions: SessionFactory, clock: Clock, receiver: WebhookReceiver
) -> None:
    pipe = Pipeline(sessions, clock, [webhook_target("hook", receiver.url)])
    story = add_story(sessions, "Coalition agrees on a reassurance force", sources=5)
    ids = []
    for i in range(10):
        ids.append(add_article(sessions, story_id=story, title=f"Reassurance force, take {i}"))
        result = pipe.evaluate()
        assert result.articles == 1 and result.matches["coalition"] == 1
        clock.advance(seconds=10)  # all ten inside the 2m group_wait
        assert pipe.flush().deliveries == 0
    [alert] = alerts(sessions)
    assert alert.status == "pending" and alert.article_ids == ids and alert.story_id == story
    clock.advance(minutes=2)
    flushed = pipe.flush()
    assert flushed.notified == {"coalition": 1} and flushed.deliveries == 1
    outcome = await pipe.deliver()
    assert outcome.count("sent") == 1
    assert len(receiver.accepted) == 1
    body = receiver.accepted[0].json
    assert [a["id"] for a in body["articles"]] == ids
    assert body["story"]["id"] == story and body["rule"] == "coalition"
    with sessions() as s:
        statuses = set(s.exec(select(Article.status)).all())
    assert statuses == {ArticleStatus.EVALUATED}
    # Nothing more to send: later runs find no work.
    clock.advance(hours=1)
    assert pipe.flush().deliveries == 0
    assert (await pipe.deliver()).count("sent") == 0
    assert len(receiver.received) == 1


def test_non_matching_articles_are_evaluated_without_alerts(
    sessions: SessionFactory, pipe: Pipeline
) -> None:
    add_article(sessions, relevant=False, relevance_score=0.1, topics={"off_topic": 0.9})
    add_article(sessions, topics={"reassurance_force": 0.3})  # under min_confidence
    add_article(sessions, classified=False)  # not classified yet: not ours to take
    result = pipe.evaluate()
    assert result.articles == 2 and not result.matches
    assert alerts(sessions) == []
    with sessions() as s:
        assert sorted(s.exec(select(Article.status)).all()) == [
            "evaluated", "evaluated", "new",
        ]  # fmt: skip


def test_one_delivery_row_per_target_each_with_its_own_key(
    sessions: SessionFactory, clock: Clock, pipe: Pipeline
) -> None:
    add_article(sessions, story_id=add_story(sessions, "s"))
    pipe.evaluate()
    clock.advance(minutes=3)
    assert pipe.flush().deliveries == 2
    rows = deliveries(sessions)
    assert {(d.target, d.target_kind) for d in rows} == {("hook", "webhook"), ("mail", "email")}
    assert len({d.idempotency_key for d in rows}) == 2
    assert all(d.status == "pending" and d.next_attempt_at == clock() for d in rows)
    assert all(d.expires_at == clock() + timedelta(hours=24) for d in rows)
    [alert] = alerts(sessions)
    assert alert.status == "notified" and alert.notified_at == clock() and alert.open_key is None


def test_repeat_interval_holds_the_next_notification_of_a_group(
    sessions: SessionFactory, clock: Clock, pipe: Pipeline
) -> None:
    story = add_story(sessions, "s")
    add_article(sessions, story_id=story)
    pipe.evaluate()
    clock.advance(minutes=2)
    pipe.flush()
    notified_at = clock()
    clock.advance(minutes=30)
    later = add_article(sessions, story_id=story)
    pipe.evaluate()
    _first, second = alerts(sessions)
    assert second.status == "pending" and second.article_ids == [later]
    assert second.notify_at == notified_at + timedelta(hours=6)  # not 2m from now
    clock.advance(hours=5)
    assert pipe.flush().deliveries == 0
    clock.advance(hours=1)
    assert pipe.flush().notified == {"coalition": 1}
    # Another story is another group: its own 2m wait.
    add_article(sessions, story_id=add_story(sessions, "other"))
    pipe.evaluate()
    third = alerts(sessions)[-1]
    assert third.notify_at == clock() + timedelta(minutes=2)


def test_silence_records_matches_but_holds_the_notification(
    sessions: SessionFactory, clock: Clock, pipe: Pipeline
) -> None:
    story = add_story(sessions, "s")
    other = add_story(sessions, "other")
    with transaction(sessions) as s:
        silence = create_silence(
            s, rule="coalition", story_id=story, duration=timedelta(hours=6), now=clock(),
            comment="known story",
        )  # fmt: skip
        silence_id = silence.id
    for _ in range(3):
        add_article(sessions, story_id=story)
    add_article(sessions, story_id=other)
    result = pipe.evaluate()
    assert result.silenced == {"coalition": 3} and result.matches == {"coalition": 4}
    held, open_ = alerts(sessions)
    assert held.status == "silenced" and held.silence_id == silence_id
    assert len(held.article_ids) == 3
    clock.advance(minutes=5)
    pipe.flush()
    rows = deliveries(sessions)
    assert {d.alert_id for d in rows} == {open_.id}  # only the other story is delivered


def test_silence_created_during_group_wait_holds_the_pending_alert(
    sessions: SessionFactory, clock: Clock, pipe: Pipeline
) -> None:
    for i in range(10):  # ten stories, one rule-wide group
        add_article(sessions, story_id=add_story(sessions, f"story {i}"))
    pipe.rules_text = pipe.rules_text.replace("group_by: [story]", "group_by: [rule]")
    pipe.evaluate()
    [alert] = alerts(sessions)
    assert len(alert.article_ids) == 10 and alert.group_key == "rule=coalition"
    clock.advance(minutes=1)
    with transaction(sessions) as s:
        create_silence(s, rule="coalition", duration=timedelta(hours=1), now=clock())
    clock.advance(minutes=2)
    result = pipe.flush()
    assert result.silenced == {"coalition": 1} and result.deliveries == 0
    [alert] = alerts(sessions)
    assert alert.status == "silenced" and alert.silence_id is not None
    assert deliveries(sessions) == []


def test_expired_silence_no_longer_holds(
    sessions: SessionFactory, clock: Clock, pipe: Pipeline
) -> None:
    with transaction(sessions) as s:
        create_silence(s, rule="coalition", duration=timedelta(minutes=10), now=clock())
    clock.advance(minutes=11)
    add_article(sessions)
    pipe.evaluate()
    clock.advance(minutes=2)
    assert pipe.flush().deliveries == 2


def test_only_one_open_alert_per_group_even_under_concurrent_writers(
    sessions: SessionFactory, clock: Clock
) -> None:
    with transaction(sessions) as s:
        s.add(Alert(rule="r", group_key="story=1", open_key="r|story=1", notify_at=clock()))
    with pytest.raises(IntegrityError), transaction(sessions) as s:
        s.add(Alert(rule="r", group_key="story=1", open_key="r|story=1", notify_at=clock()))
    with transaction(sessions) as s:  # closed alerts (open_key NULL) are unlimited
        for _ in range(3):
            s.add(Alert(rule="r", group_key="story=1", status="notified"))
    with sessions() as s:
        assert s.execute(sa.select(sa.func.count()).select_from(Alert)).scalar() == 4


def test_a_rule_without_targets_notifies_every_target_and_unknown_rules_still_deliver(
    sessions: SessionFactory, clock: Clock, pipe: Pipeline
) -> None:
    pipe.rules_text = pipe.rules_text.replace(
        "severity: warning", "severity: warning\n    targets: [mail]"
    )
    add_article(sessions)
    pipe.evaluate()
    clock.advance(minutes=2)
    pipe.flush()
    assert [d.target for d in deliveries(sessions)] == ["mail"]
    # A pending alert whose rule was removed by a reload is still delivered (to every target).
    add_article(sessions, story_id=add_story(sessions, "s2"))
    pipe.evaluate()
    pipe.rules_text = "rules: []\n"
    clock.advance(minutes=2)
    pipe.flush()
    assert sorted(d.target for d in deliveries(sessions)[1:]) == ["hook", "mail"]


def test_two_workers_evaluating_one_story_at_once_open_one_alert(
    any_db_url: str, clock: Clock
) -> None:
    """On PostgreSQL the workers really overlap (SKIP LOCKED claims, one open alert per group)."""
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    try:
        sessions = session_factory(engine)
        story = add_story(sessions, "busy story")
        ids = {add_article(sessions, story_id=story) for _ in range(20)}
        rules = Pipeline(sessions, clock, []).rules
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def worker(owner: str) -> None:
            try:
                start.wait()
                while evaluate_batch(sessions, rules, owner=owner, now=clock(), limit=2).articles:
                    pass
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        [alert] = alerts(sessions)
        assert alert.status == "pending" and sorted(alert.article_ids) == sorted(ids)
        with sessions() as s:
            assert set(s.exec(select(Article.status)).all()) == {ArticleStatus.EVALUATED}
    finally:
        engine.dispose()


def test_evaluation_racing_the_flush_loses_no_article(any_db_url: str, clock: Clock) -> None:
    """Articles keep joining a group while the flush closes it: each lands in exactly one alert."""
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    try:
        sessions = session_factory(engine)
        story = add_story(sessions, "busy story")
        ids = [add_article(sessions, story_id=story) for _ in range(40)]
        pipe = Pipeline(sessions, clock, [webhook_target("hook", "http://127.0.0.1:9/")])
        pipe.rules_text = pipe.rules_text.replace("group_wait: 2m", "group_wait: 0s").replace(
            "repeat_interval: 6h", "repeat_interval: 0s"
        )
        rules = pipe.rules
        done = threading.Event()
        errors: list[BaseException] = []

        def evaluator() -> None:
            try:
                while evaluate_batch(sessions, rules, owner="e", now=clock(), limit=1).articles:
                    pass
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        def flusher() -> None:
            try:
                while not done.is_set():
                    pipe.flush()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=evaluator), threading.Thread(target=flusher)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        pipe.flush()
        assert errors == []
        found = [i for a in alerts(sessions) for i in a.article_ids]
        assert sorted(found) == sorted(ids)  # none lost, none twice
        assert all(a.status == "notified" for a in alerts(sessions))
        assert len(deliveries(sessions)) == len(alerts(sessions))
    finally:
        engine.dispose()
