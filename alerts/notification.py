"""What a notification says: an alert with its rule, story and articles, read from storage.

Notifiers render these views; they never touch the database. A view is built each time a
delivery is attempted, from the alert's stored articles and their classifications.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from alerts.rules import Rule
from alerts.text import evidence_paragraph
from storage.models import Alert, Article, Classification, Feed, Story


@dataclass(frozen=True)
class TopicScore:
    name: str
    confidence: float


@dataclass(frozen=True)
class ArticleView:
    id: int
    title: str
    url: str | None
    outlet: str | None
    published_at: datetime | None
    fetched_at: datetime | None
    language: str | None
    story_id: int | None
    relevant: bool | None
    relevance_confidence: float | None
    topics: tuple[TopicScore, ...]
    stance: str | None
    stance_confidence: float | None
    evidence: str


@dataclass(frozen=True)
class StoryView:
    id: int
    title: str
    article_count: int
    source_count: int


@dataclass(frozen=True)
class Notification:
    """One alert as its targets see it. ``id`` is the delivery's idempotency key."""

    id: str
    type: str  # "alert.fired" | "alert.test"
    alert_id: int | None
    rule: str
    rule_description: str
    severity: str
    group_key: str
    fired_at: datetime
    notified_at: datetime | None
    story: StoryView | None
    articles: tuple[ArticleView, ...] = field(default_factory=tuple)

    @property
    def outlets(self) -> list[str]:
        seen: dict[str, None] = {}
        for a in self.articles:
            if a.outlet:
                seen.setdefault(a.outlet, None)
        return list(seen)

    @property
    def headline(self) -> str:
        if self.story is not None:
            return self.story.title
        return self.articles[0].title if self.articles else self.rule


def relevance_confidence(relevant: bool, score: float) -> float:
    """``relevance_score`` is the probability of relevance; the decision's confidence follows."""
    return score if relevant else 1.0 - score


def latest_classifications(session: Session, article_ids: Sequence[int]) -> dict[int, Any]:
    """The newest classification of each article (by id), keyed by article id."""
    if not article_ids:
        return {}
    c: Any = Classification
    rows = session.execute(
        sa.select(c).where(c.article_id.in_(list(article_ids))).order_by(c.article_id, c.id)
    ).scalars()
    out: dict[int, Any] = {}
    for row in rows:
        out[row.article_id] = row  # later ids overwrite earlier ones
    return out


def article_view(article: Article, cls: Classification | None, rule: Rule | None) -> ArticleView:
    topics: tuple[TopicScore, ...] = ()
    if cls is not None:
        topics = tuple(
            TopicScore(t, round(float(cls.topic_scores.get(t, 0.0)), 4)) for t in cls.topics
        )
    evidence = evidence_paragraph(
        article.text,
        keywords=rule.match.keywords if rule is not None else None,
        topics=[t.name for t in topics],
    )
    return ArticleView(
        id=int(article.id or 0),
        title=article.title,
        url=article.url,
        outlet=article.outlet,
        published_at=article.published_at,
        fetched_at=article.fetched_at,
        language=article.language,
        story_id=article.story_id,
        relevant=cls.relevant if cls is not None else None,
        relevance_confidence=(
            round(relevance_confidence(cls.relevant, cls.relevance_score), 4) if cls else None
        ),
        topics=topics,
        stance=cls.stance if cls is not None else None,
        stance_confidence=round(cls.stance_score, 4) if cls is not None else None,
        evidence=evidence,
    )


def outlet_of(article: Article, feed: Feed | None) -> str | None:
    if article.outlet:
        return article.outlet
    if feed is not None:
        return feed.title or feed.url
    return None


def load_notification(
    session: Session, alert: Alert, key: str, rule: Rule | None, type_: str = "alert.fired"
) -> Notification:
    """The view of ``alert`` for a delivery whose idempotency key is ``key``."""
    a: Any = Article
    ids = [int(i) for i in alert.article_ids]
    articles = {row.id: row for row in session.execute(sa.select(a).where(a.id.in_(ids))).scalars()}
    classes = latest_classifications(session, ids)
    feed_ids = {row.feed_id for row in articles.values() if row.feed_id is not None}
    feeds: dict[int, Feed] = {}
    if feed_ids:
        f: Any = Feed
        feeds = {row.id: row for row in session.execute(sa.select(f).where(f.id.in_(feed_ids)))
                 .scalars()}  # fmt: skip
    views = []
    for article_id in ids:  # in the order they joined the alert
        row = articles.get(article_id)
        if row is None:  # removed by retention since; the alert still says what it can
            continue
        view = article_view(row, classes.get(article_id), rule)
        outlet = outlet_of(row, feeds.get(row.feed_id) if row.feed_id is not None else None)
        views.append(replace(view, outlet=outlet))
    story = session.get(Story, alert.story_id) if alert.story_id is not None else None
    return Notification(
        id=key,
        type=type_,
        alert_id=alert.id,
        rule=alert.rule,
        rule_description=rule.description if rule is not None else "",
        severity=alert.severity,
        group_key=alert.group_key,
        fired_at=alert.fired_at,
        notified_at=alert.notified_at,
        story=story_view(story),
        articles=tuple(views),
    )


def story_view(story: Story | None) -> StoryView | None:
    if story is None or story.id is None:
        return None
    return StoryView(story.id, story.title, story.article_count, story.source_count)
