"""Story clustering: articles about the same event, across outlets and languages, form a story.

An article joins the story whose centroid is most similar to its sentence vector (cosine), if
that similarity reaches the threshold and the story was last seen within the time window before
the article; otherwise it starts a new story. The multilingual encoder puts an Italian and an
English report of one event close together, so they end up in one story.

``Story.centroid`` stores the running sum of the member vectors (float32 bytes): joining adds
the vector, leaving subtracts it, and the centroid is the sum's direction. ``article_count``,
``source_count`` (distinct outlets) and ``last_seen_at`` are kept up to date in the same
transaction as the article.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import sqlalchemy as sa
from sqlmodel import Session, col

from storage.models import Article, Story


def to_float16_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f2").tobytes()


def from_float16_bytes(data: bytes) -> np.ndarray:
    v = np.frombuffer(data, dtype="<f2").astype(np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _sum_of(story: Story, dim: int) -> np.ndarray:
    if not story.centroid:
        return np.zeros(dim, dtype=np.float32)
    return np.frombuffer(story.centroid, dtype="<f4").astype(np.float32).copy()


def article_time(article: Article) -> datetime:
    return article.published_at or article.fetched_at


def _source_key(outlet: str | None, feed_id: int | None, source: str) -> str:
    if outlet:
        return f"outlet:{outlet.casefold()}"
    if feed_id is not None:
        return f"feed:{feed_id}"
    return f"source:{source}"


@dataclass(frozen=True)
class StoryChoice:
    story: Story
    similarity: float
    created: bool


def _refresh_counts(session: Session, story: Story) -> None:
    """Recount the story's articles and distinct outlets, in the database.

    Only the distinct (outlet, feed, source) triples come back, not one row per member: a story
    of thousands of articles costs an index scan, not thousands of objects.
    """
    member = col(Article.story_id) == story.id
    story.article_count = int(
        session.execute(sa.select(sa.func.count()).select_from(Article).where(member)).scalar() or 0
    )
    triples = session.execute(
        sa.select(col(Article.outlet), col(Article.feed_id), col(Article.source))
        .where(member)
        .distinct()
    ).all()
    story.source_count = len({_source_key(o, f, s) for o, f, s in triples})


def assign_story(
    session: Session,
    article: Article,
    vector: np.ndarray,
    *,
    threshold: float,
    window: timedelta,
) -> StoryChoice:
    """Put ``article`` into the most similar recent story, or a new one. Flushes the session."""
    when = article_time(article)
    v = np.asarray(vector, dtype=np.float32)
    v = v / max(float(np.linalg.norm(v)), 1e-12)
    table: object = Story
    candidates = (
        session.execute(
            sa.select(table)  # type: ignore[call-overload]
            .where(Story.last_seen_at >= when - window, Story.first_seen_at <= when + window)
            .order_by(Story.id)
        )
        .scalars()
        .all()
    )
    best: Story | None = None
    best_sim = -1.0
    for story in candidates:
        total = _sum_of(story, v.shape[0])
        norm = float(np.linalg.norm(total))
        if norm == 0 or total.shape != v.shape:
            continue
        sim = float(total @ v) / norm
        if sim > best_sim:
            best, best_sim = story, sim
    created = False
    if best is None or best_sim < threshold:
        best = Story(
            title=article.title[:512] or "(untitled)",
            first_seen_at=when,
            last_seen_at=when,
            article_count=0,
            source_count=0,
            centroid=np.zeros_like(v).astype("<f4").tobytes(),
        )
        session.add(best)
        session.flush()
        best_sim = 1.0
        created = True
    elif session.get_bind().dialect.name == "postgresql":
        # Another replica may be updating the same running sum: re-read it under a row lock.
        session.refresh(best, with_for_update=True)
    total = _sum_of(best, v.shape[0]) + v
    best.centroid = total.astype("<f4").tobytes()
    best.first_seen_at = min(best.first_seen_at, when)
    best.last_seen_at = max(best.last_seen_at, when)
    article.story_id = best.id
    session.add(article)
    session.flush()
    _refresh_counts(session, best)
    session.add(best)
    session.flush()
    return StoryChoice(best, best_sim, created)


def leave_story(session: Session, article: Article, old_vector: np.ndarray | None) -> None:
    """Take ``article`` out of its story (its content or relevance changed)."""
    if article.story_id is None:
        return
    story = session.get(
        Story, article.story_id, with_for_update=session.get_bind().dialect.name == "postgresql"
    )
    article.story_id = None
    session.add(article)
    session.flush()
    if story is None:
        return
    if old_vector is not None and story.centroid:
        total = _sum_of(story, old_vector.shape[0]) - old_vector.astype(np.float32)
        story.centroid = total.astype("<f4").tobytes()
    _refresh_counts(session, story)
    session.add(story)
    session.flush()
