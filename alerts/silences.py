"""Silences: a rule (optionally one story) muted until a time. Silenced alerts are recorded,
never delivered. Used by evaluation, the outbox, the CLI and the HTTP API."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from storage.models import Silence


def create_silence(
    session: Session,
    *,
    rule: str,
    duration: timedelta,
    now: datetime,
    story_id: int | None = None,
    comment: str | None = None,
    created_by: str | None = None,
) -> Silence:
    if duration.total_seconds() <= 0:
        raise ValueError("a silence needs a positive duration")
    silence = Silence(
        rule=rule,
        story_id=story_id,
        starts_at=now,
        ends_at=now + duration,
        comment=comment,
        created_by=created_by,
        created_at=now,
    )
    session.add(silence)
    session.flush()
    return silence


def expire_silence(session: Session, silence_id: int, now: datetime) -> Silence | None:
    """End a silence now; returns it, or None when there is no such silence."""
    silence = session.get(Silence, silence_id)
    if silence is None:
        return None
    if silence.ends_at > now:
        silence.ends_at = now
        session.add(silence)
    return silence


def active_silence(
    session: Session, rule: str, story_id: int | None, now: datetime
) -> Silence | None:
    """The active silence covering ``rule`` (and ``story_id``), the longest-lasting first."""
    s: Any = Silence
    story_match = s.story_id.is_(None)
    if story_id is not None:
        story_match = sa.or_(story_match, s.story_id == story_id)
    stmt = (
        sa.select(s)
        .where(s.rule == rule, s.starts_at <= now, s.ends_at > now, story_match)
        .order_by(s.ends_at.desc(), s.id)
        .limit(1)
    )
    return session.execute(stmt).scalars().first()


def list_silences(
    session: Session, now: datetime, *, include_expired: bool = False
) -> list[Silence]:
    s: Any = Silence
    stmt = sa.select(s).order_by(s.ends_at.desc(), s.id.desc())
    if not include_expired:
        stmt = stmt.where(s.ends_at > now)
    return list(session.execute(stmt).scalars())
