from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlmodel import select

from storage.db import SessionFactory, transaction
from storage.models import Article, Classification, Story
from storage.retention import purge

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def test_old_finished_articles_go_pending_ones_stay(sessions: SessionFactory) -> None:
    with transaction(sessions) as s:
        old_story = Story(title="old", first_seen_at=NOW - timedelta(days=300),
                          last_seen_at=NOW - timedelta(days=300))  # fmt: skip
        s.add(old_story)
        s.flush()
        rows = [
            ("old-done", 200, "evaluated", old_story.id),
            ("old-pending", 200, "new", None),
            ("old-classified", 200, "classified", None),
            ("recent-done", 10, "evaluated", None),
        ]
        for uid, age, status, story in rows:
            a = Article(uid=uid, source="seed", guid=uid, title=uid, text="x",
                        content_hash=uid, fetched_at=NOW - timedelta(days=age),
                        status=status, story_id=story)  # fmt: skip
            s.add(a)
            s.flush()
            assert a.id is not None
            s.add(Classification(article_id=a.id, model_version="m", relevant=True,
                                 relevance_score=1, stance="neutral", stance_score=1))  # fmt: skip
    with transaction(sessions) as s:
        result = purge(s, NOW, keep_days=180)
    assert (result.articles, result.stories) == (1, 1)
    with sessions() as s:
        left = sorted(a.uid for a in s.exec(select(Article)))
        assert left == ["old-classified", "old-pending", "recent-done"]
        assert len(s.exec(select(Classification)).all()) == 3
    with transaction(sessions) as s:
        assert purge(s, NOW, keep_days=0).articles == 0
