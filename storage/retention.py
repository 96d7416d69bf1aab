"""Retention: forget old, fully processed articles; never touch work still pending."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col

from storage.models import Article, ArticleStatus, Classification, Story


@dataclass
class RetentionResult:
    articles: int = 0
    stories: int = 0


def purge(session: Session, now: datetime, keep_days: int) -> RetentionResult:
    """Delete articles fetched more than ``keep_days`` ago whose processing is finished.

    Articles still waiting for classification or evaluation are kept whatever their age, so a
    long outage never turns into lost work. Stories left with no article go too.
    ``keep_days <= 0`` keeps everything.
    """
    result = RetentionResult()
    if keep_days <= 0:
        return result
    cutoff = now - timedelta(days=keep_days)
    old = (
        sa.select(col(Article.id))
        .where(col(Article.fetched_at) < cutoff, col(Article.status) == ArticleStatus.EVALUATED)
        .scalar_subquery()
    )
    session.execute(sa.delete(Classification).where(col(Classification.article_id).in_(old)))
    deleted = session.execute(
        sa.delete(Article).where(
            col(Article.fetched_at) < cutoff, col(Article.status) == ArticleStatus.EVALUATED
        )
    )
    result.articles = int(getattr(deleted, "rowcount", 0) or 0)
    orphans = session.execute(
        sa.delete(Story).where(
            col(Story.last_seen_at) < cutoff,
            ~sa.exists().where(col(Article.story_id) == col(Story.id)),
        )
    )
    result.stories = int(getattr(orphans, "rowcount", 0) or 0)
    return result
