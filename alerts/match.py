"""Does a rule match an article? The facts of one article, read once, and a pure match.

``min_confidence`` applies to each classification condition the rule uses: the relevance
decision's confidence, each counted topic's score, the stance score. ``new_story`` means the
article is the first of its story (the lowest id; an article with no story is a story of one).
``min_story_sources`` counts the story's distinct outlets: live, the classifier's
``Story.source_count``; in a backtest, the outlets seen up to that article.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from alerts.notification import latest_classifications, relevance_confidence
from alerts.rules import Rule
from alerts.text import fold
from storage.models import Article, Feed, Story


@dataclass(frozen=True)
class ClassFacts:
    relevant: bool
    relevance_score: float
    topics: tuple[str, ...]
    topic_scores: dict[str, float]
    stance: str
    stance_score: float


@dataclass
class ArticleFacts:
    article_id: int
    title: str
    text: str
    fetched_at: datetime
    language: str | None = None
    source: str = "feed"
    outlet: str | None = None
    feed_url: str | None = None
    feed_title: str | None = None
    story_id: int | None = None
    first_in_story: bool = True
    story_sources: int = 1
    classification: ClassFacts | None = None

    @cached_property
    def folded(self) -> str:
        return fold(f"{self.title}\n{self.text}")


def rule_matches(rule: Rule, f: ArticleFacts) -> bool:
    m = rule.match
    c = f.classification
    floor = m.min_confidence
    uses_classification = m.relevant is not None or m.topics_any or m.topics_all or m.stance_in
    if uses_classification and c is None:
        return False
    if m.relevant is not None:
        assert c is not None
        if c.relevant != m.relevant:
            return False
        if floor is not None and relevance_confidence(c.relevant, c.relevance_score) < floor:
            return False
    if m.topics_any or m.topics_all:
        assert c is not None
        present = {t for t in c.topics if floor is None or c.topic_scores.get(t, 0.0) >= floor}
        if m.topics_any and not present.intersection(m.topics_any):
            return False
        if m.topics_all and not set(m.topics_all) <= present:
            return False
    if m.stance_in:
        assert c is not None
        if c.stance not in m.stance_in:
            return False
        if floor is not None and c.stance_score < floor:
            return False
    if m.languages:
        lang = (f.language or "").lower()
        if lang not in m.languages and lang.split("-")[0] not in m.languages:
            return False
    if m.feeds:
        names = {fold(x) for x in (f.feed_url, f.feed_title, f.outlet, f.source) if x}
        if not names.intersection(fold(x) for x in m.feeds):
            return False
    if m.new_story is not None and f.first_in_story != m.new_story:
        return False
    if m.min_story_sources is not None and f.story_sources < m.min_story_sources:
        return False
    return not (m.keywords and not m.keywords.search(f.folded))


def group_key(rule: Rule, f: ArticleFacts) -> str:
    """The group an article joins: by rule (one group) and/or by story."""
    parts = []
    if "rule" in rule.group_by:
        parts.append(f"rule={rule.name}")
    if "story" in rule.group_by:
        parts.append(f"story={f.story_id}" if f.story_id is not None else f"article={f.article_id}")
    return "|".join(parts)


def outlet_key(outlet: str | None, feed_id: int | None, source: str) -> str:
    if outlet:
        return "outlet:" + fold(outlet)
    if feed_id is not None:
        return f"feed:{feed_id}"
    return "source:" + source


def facts_for(session: Session, article: Article, *, history: bool = False) -> ArticleFacts:
    """Everything the rules look at for ``article``. ``history``: story counts as of then."""
    assert article.id is not None
    cls = latest_classifications(session, [article.id]).get(article.id)
    feed = session.get(Feed, article.feed_id) if article.feed_id is not None else None
    first, sources = True, 1
    if article.story_id is not None:
        a: Any = Article
        first_id = session.execute(
            sa.select(sa.func.min(a.id)).where(a.story_id == article.story_id)
        ).scalar()
        first = first_id is None or first_id >= article.id
        if history:
            rows = session.execute(
                sa.select(a.outlet, a.feed_id, a.source).where(
                    a.story_id == article.story_id, a.id <= article.id
                )
            ).all()
            sources = max(1, len({outlet_key(*row) for row in rows}))
        else:
            story = session.get(Story, article.story_id)
            sources = max(1, story.source_count) if story is not None else 1
    return ArticleFacts(
        article_id=article.id,
        title=article.title,
        text=article.text,
        fetched_at=article.fetched_at,
        language=article.language,
        source=article.source,
        outlet=article.outlet,
        feed_url=feed.url if feed is not None else None,
        feed_title=feed.title if feed is not None else None,
        story_id=article.story_id,
        first_in_story=first,
        story_sources=sources,
        classification=(
            ClassFacts(
                relevant=cls.relevant,
                relevance_score=float(cls.relevance_score),
                topics=tuple(cls.topics),
                topic_scores={k: float(v) for k, v in cls.topic_scores.items()},
                stance=cls.stance,
                stance_score=float(cls.stance_score),
            )
            if cls is not None
            else None
        ),
    )
