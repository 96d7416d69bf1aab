"""The records that carry work from one stage to the next (DESIGN.md, "Records").

Every stage reads and writes these tables and nothing else of another stage. Times are stored
as timezone-aware UTC datetimes. Pending work is found by ``status`` and claimed with a lease
(``claimed_by``, ``claimed_until``); see :mod:`storage.claims`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime`` that always comes back timezone-aware in UTC (SQLite forgets zones)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _dt(nullable: bool = True, index: bool = False) -> Any:
    return sa.Column(UTCDateTime(), nullable=nullable, index=index)


class ArticleStatus:
    NEW = "new"
    CLASSIFIED = "classified"
    EVALUATED = "evaluated"


class Feed(SQLModel, table=True):
    __tablename__ = "feed"

    id: int | None = Field(default=None, primary_key=True)
    url: str = Field(sa_column=sa.Column(sa.String(2048), nullable=False, unique=True))
    title: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    site_url: str | None = Field(default=None, sa_column=sa.Column(sa.String(2048)))
    language: str | None = Field(default=None, sa_column=sa.Column(sa.String(16)))
    enabled: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False))
    # Conditional GET state; body_hash catches servers that keep an ETag after a change.
    etag: str | None = Field(default=None, sa_column=sa.Column(sa.String(512)))
    last_modified: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    body_hash: str | None = Field(default=None, sa_column=sa.Column(sa.String(64)))
    polls_since_unconditional: int = Field(
        default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0")
    )
    # Schedule.
    interval: int = Field(
        default=900, sa_column=sa.Column(sa.Integer, nullable=False), description="seconds"
    )
    # Set by `feeds add --interval`: the interval is kept as given, never adapted.
    interval_fixed: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    # Observed mean seconds between the feed's entries (drives the adaptive interval).
    publish_interval: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    # The feed's own <ttl>, in seconds, from its last parsed document.
    ttl_seconds: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    next_check_at: datetime | None = Field(default=None, sa_column=_dt(index=True))
    next_check_reason: str | None = Field(default=None, sa_column=sa.Column(sa.String(256)))
    last_checked_at: datetime | None = Field(default=None, sa_column=_dt())
    last_success_at: datetime | None = Field(default=None, sa_column=_dt())
    last_new_entry_at: datetime | None = Field(default=None, sa_column=_dt())
    # Health.
    consecutive_failures: int = Field(
        default=0, sa_column=sa.Column(sa.Integer, nullable=False, server_default="0")
    )
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_error_kind: str | None = Field(default=None, sa_column=sa.Column(sa.String(32)))
    last_warning: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))
    # Lease.
    claimed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    claimed_until: datetime | None = Field(default=None, sa_column=_dt())


class Story(SQLModel, table=True):
    """A cluster of articles about one event, across outlets and languages."""

    __tablename__ = "story"

    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(sa_column=sa.Column(sa.String(512), nullable=False))
    first_seen_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))
    last_seen_at: datetime = Field(
        default_factory=utcnow, sa_column=_dt(nullable=False, index=True)
    )
    article_count: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    source_count: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    # Running sum of member embeddings (float32 bytes); the centroid is its normalisation.
    centroid: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary))


class Article(SQLModel, table=True):
    __tablename__ = "article"
    __table_args__ = (sa.Index("ix_article_status_claim", "status", "claimed_until"),)

    id: int | None = Field(default=None, primary_key=True)
    # Stable identity: "seed:<file name>" or "feed:<feed id>:<guid>"; ingesting twice is a no-op.
    uid: str = Field(sa_column=sa.Column(sa.String(2100), nullable=False, unique=True))
    source: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))  # seed | feed
    feed_id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("feed.id", ondelete="SET NULL"), index=True),
    )
    guid: str = Field(sa_column=sa.Column(sa.String(2048), nullable=False))
    url: str | None = Field(default=None, sa_column=sa.Column(sa.String(2048), index=True))
    outlet: str | None = Field(default=None, sa_column=sa.Column(sa.String(256)))
    title: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    text: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    language: str | None = Field(default=None, sa_column=sa.Column(sa.String(16)))
    published_at: datetime | None = Field(default=None, sa_column=_dt(index=True))
    # Where published_at came from: "entry", "updated", "first_seen", "text".
    published_source: str | None = Field(default=None, sa_column=sa.Column(sa.String(16)))
    fetched_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))
    updated_at: datetime | None = Field(default=None, sa_column=_dt())
    content_hash: str = Field(sa_column=sa.Column(sa.String(64), nullable=False, index=True))
    story_id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("story.id", ondelete="SET NULL"), index=True),
    )
    # Sentence embedding (float16 bytes), computed once by the classifier.
    embedding: bytes | None = Field(default=None, sa_column=sa.Column(sa.LargeBinary))
    # What the embedding was computed from: "<encoder id>@<content_hash prefix>"; a new encoder
    # or changed content makes it stale.
    embedding_key: str | None = Field(default=None, sa_column=sa.Column(sa.String(200)))
    status: str = Field(
        default=ArticleStatus.NEW, sa_column=sa.Column(sa.String(16), nullable=False)
    )
    claimed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    claimed_until: datetime | None = Field(default=None, sa_column=_dt())


class Classification(SQLModel, table=True):
    __tablename__ = "classification"
    __table_args__ = (sa.UniqueConstraint("article_id", "model_version"),)

    id: int | None = Field(default=None, primary_key=True)
    article_id: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("article.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    model_version: str = Field(sa_column=sa.Column(sa.String(128), nullable=False))
    relevant: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False))
    relevance_score: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    topics: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False))
    topic_scores: dict[str, float] = Field(
        default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False)
    )
    stance: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    stance_score: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    stance_scores: dict[str, float] = Field(
        default_factory=dict, sa_column=sa.Column(sa.JSON, nullable=False)
    )
    created_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))


class Alert(SQLModel, table=True):
    """One notification group: a rule's matches for one group key inside one window."""

    __tablename__ = "alert"
    __table_args__ = (
        sa.Index("ix_alert_rule_group", "rule", "group_key"),
        sa.Index("ux_alert_open_key", "open_key", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str = Field(sa_column=sa.Column(sa.String(128), nullable=False))
    group_key: str = Field(sa_column=sa.Column(sa.String(512), nullable=False))
    severity: str = Field(default="info", sa_column=sa.Column(sa.String(16), nullable=False))
    story_id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.Integer, sa.ForeignKey("story.id", ondelete="SET NULL")),
    )
    article_ids: list[int] = Field(
        default_factory=list, sa_column=sa.Column(sa.JSON, nullable=False)
    )
    fired_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False, index=True))
    # pending (waiting out group_wait) -> notified | silenced
    status: str = Field(default="pending", sa_column=sa.Column(sa.String(16), nullable=False))
    notify_at: datetime | None = Field(default=None, sa_column=_dt(index=True))
    notified_at: datetime | None = Field(default=None, sa_column=_dt())
    silence_id: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    # "<rule>|<group_key>" while pending, NULL after: at most one open alert per group, even
    # when several replicas evaluate at once (the unique index refuses a second one).
    open_key: str | None = Field(default=None, sa_column=sa.Column(sa.String(700)))
    claimed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    claimed_until: datetime | None = Field(default=None, sa_column=_dt())


class Silence(SQLModel, table=True):
    __tablename__ = "silence"

    id: int | None = Field(default=None, primary_key=True)
    rule: str = Field(sa_column=sa.Column(sa.String(128), nullable=False))
    story_id: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    starts_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))
    ends_at: datetime = Field(sa_column=_dt(nullable=False, index=True))
    comment: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))


class Delivery(SQLModel, table=True):
    """One alert to one target; the outbox row that is retried until sent or dead-lettered."""

    __tablename__ = "delivery"
    __table_args__ = (
        sa.UniqueConstraint("alert_id", "target"),
        sa.Index("ix_delivery_due", "status", "next_attempt_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("alert.id", ondelete="CASCADE"), nullable=False
        )
    )
    target: str = Field(sa_column=sa.Column(sa.String(128), nullable=False))
    target_kind: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    # pending -> sent | dead
    status: str = Field(default="pending", sa_column=sa.Column(sa.String(16), nullable=False))
    attempts: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    next_attempt_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    idempotency_key: str = Field(sa_column=sa.Column(sa.String(128), nullable=False, unique=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_dt(nullable=False))
    # Dead-lettered when still failing after this (created_at + retry.max_age; reset by retry).
    expires_at: datetime | None = Field(default=None, sa_column=_dt())
    sent_at: datetime | None = Field(default=None, sa_column=_dt())
    claimed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(128)))
    claimed_until: datetime | None = Field(default=None, sa_column=_dt())
