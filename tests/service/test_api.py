from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.config import Settings
from service.context import AppContext, build_context
from service.http import Readiness, create_app
from storage.db import transaction
from storage.models import Article, Classification, Story

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture
def ctx(db_url: str) -> Iterator[AppContext]:
    context = build_context(Settings(database_url=db_url, api_token=SecretStr("tok")))
    context.clock = lambda: T0
    yield context
    context.close()


@pytest.fixture
def client(ctx: AppContext) -> TestClient:
    readiness = Readiness(scheduler_running=True)
    return TestClient(create_app(ctx, readiness))


def _store(ctx: AppContext) -> None:
    with transaction(ctx.sessions) as s:
        story = Story(title="Coalition summit", first_seen_at=T0, last_seen_at=T0)
        s.add(story)
        s.flush()
        for i in range(7):
            a = Article(
                uid=f"t:{i}", source="feed", guid=str(i), title=f"Title {i} forza",
                text="La coalizione dei volenterosi" if i % 2 else "Football results",
                language="it" if i < 4 else "en", content_hash=f"h{i}",
                fetched_at=T0 + timedelta(hours=i), story_id=story.id,
                status="classified",
            )  # fmt: skip
            s.add(a)
            s.flush()
            assert a.id is not None
            s.add(
                Classification(
                    article_id=a.id, model_version="m1", relevant=bool(i % 2),
                    relevance_score=0.9, topics=["reassurance_force"] if i % 2 else ["off_topic"],
                    topic_scores={}, stance="supportive" if i % 2 else "neutral",
                    stance_score=0.8, stance_scores={},
                )
            )  # fmt: skip


def test_articles_filters_and_cursor_pagination(ctx: AppContext, client: TestClient) -> None:
    _store(ctx)
    page = client.get("/api/articles", params={"limit": 3}).json()
    assert [a["id"] for a in page["items"]] == [7, 6, 5]
    seen = [a["id"] for a in page["items"]]
    while page["next_cursor"]:
        page = client.get(
            "/api/articles", params={"limit": 3, "cursor": page["next_cursor"]}
        ).json()
        seen += [a["id"] for a in page["items"]]
    assert seen == [7, 6, 5, 4, 3, 2, 1]

    rel = client.get("/api/articles", params={"relevant": "true"}).json()["items"]
    assert [a["id"] for a in rel] == [6, 4, 2]
    assert all(a["classification"]["relevant"] for a in rel)
    topic = client.get("/api/articles", params={"topic": "reassurance_force"}).json()["items"]
    assert [a["id"] for a in topic] == [6, 4, 2]
    stance = client.get("/api/articles", params={"stance": "neutral", "language": "en"}).json()
    assert [a["id"] for a in stance["items"]] == [7, 5]
    since = client.get("/api/articles", params={"since": (T0 + timedelta(hours=5)).isoformat()})
    assert [a["id"] for a in since.json()["items"]] == [7, 6]
    q = client.get("/api/articles", params={"q": "VOLENTEROSI"}).json()["items"]
    assert [a["id"] for a in q] == [6, 4, 2]

    one = client.get("/api/articles/2").json()
    assert one["text"] == "La coalizione dei volenterosi"
    assert one["classification"]["topics"] == ["reassurance_force"]
    missing = client.get("/api/articles/999")
    assert missing.status_code == 404 and "999" in missing.json()["error"]
    bad = client.get("/api/articles", params={"limit": 0})
    assert bad.status_code == 422 and "limit" in bad.json()["error"]
    assert client.get("/api/articles", params={"cursor": "!!"}).status_code == 400
    stories = client.get("/api/stories").json()["items"]
    assert stories[0]["title"] == "Coalition summit"


def test_writes_need_the_token(ctx: AppContext, client: TestClient) -> None:
    body = {"url": "https://example.org/feed.xml"}
    assert client.post("/api/feeds", json=body).status_code == 401
    wrong = client.post("/api/feeds", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]
    ok = client.post("/api/feeds", json=body, headers={"Authorization": "Bearer tok"})
    assert ok.status_code == 201, ok.text
    feed_id = ok.json()["id"]
    dup = client.post("/api/feeds", json=body, headers={"Authorization": "Bearer tok"})
    assert dup.status_code == 409
    assert [f["url"] for f in client.get("/api/feeds").json()["items"]] == [body["url"]]
    assert client.delete(f"/api/feeds/{feed_id}").status_code == 401
    assert (
        client.delete(f"/api/feeds/{feed_id}", headers={"Authorization": "Bearer tok"}).status_code
        == 204
    )
    auth = {"Authorization": "Bearer tok"}
    sil = client.post("/api/silences", json={"rule": "r1", "duration": "2h"}, headers=auth)
    assert sil.status_code == 201
    assert sil.json()["ends_at"].startswith("2026-03-01T14:00")
    expired = client.delete(f"/api/silences/{sil.json()['id']}", headers=auth).json()
    assert expired["ends_at"].startswith("2026-03-01T12:00")


def test_writes_refused_without_a_configured_token(db_url: str) -> None:
    context = build_context(Settings(database_url=db_url))
    client = TestClient(create_app(context, Readiness(scheduler_running=True)))
    r = client.post("/api/feeds", json={"url": "https://example.org/f"})
    assert r.status_code == 403 and "api_token" in r.json()["error"]
    context.close()


def test_readyz_names_the_reason(ctx: AppContext) -> None:
    readiness = Readiness(scheduler_running=False, checks={"model": "not loaded yet"})
    r = TestClient(create_app(ctx, readiness)).get("/readyz")
    assert r.status_code == 503
    assert "scheduler not running" in r.json()["reasons"]
    assert "model: not loaded yet" in r.json()["reasons"]
    assert (
        TestClient(create_app(ctx, Readiness(scheduler_running=True))).get("/readyz").status_code
        == 200
    )
