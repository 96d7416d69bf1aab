"""Evaluation: claim classified articles → match the rules → add them to alert groups.

Grouping works like Alertmanager's: the first match of a group opens a *pending* alert that
waits ``group_wait``; matches arriving meanwhile join it, so they make one notification. A
group that notified less than ``repeat_interval`` ago opens its next alert no earlier than the
end of that interval. A match covered by a silence is recorded in a *silenced* alert, never
delivered. The article becomes ``evaluated`` in the same transaction that records its matches.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from alerts.match import ArticleFacts, facts_for, group_key, rule_matches
from alerts.rules import Rule, RuleSet
from alerts.silences import active_silence
from storage.claims import claim, release, still_owned
from storage.db import SessionFactory, begin_write, transaction
from storage.models import Alert, Article, ArticleStatus

log = logging.getLogger(__name__)

OPENED, JOINED, SILENCED = "opened", "joined", "silenced"


@dataclass
class EvaluationResult:
    articles: int = 0
    matches: Counter[str] = field(default_factory=Counter)  # rule -> articles matched
    opened: Counter[str] = field(default_factory=Counter)  # rule -> new pending alerts
    silenced: Counter[str] = field(default_factory=Counter)  # rule -> silenced matches
    lost_leases: int = 0

    def add(self, other: EvaluationResult) -> None:
        self.articles += other.articles
        self.matches.update(other.matches)
        self.opened.update(other.opened)
        self.silenced.update(other.silenced)
        self.lost_leases += other.lost_leases


def next_notify_at(now: datetime, rule: Rule, last_notified_at: datetime | None) -> datetime:
    """When a newly opened group notifies: after ``group_wait``, and never within
    ``repeat_interval`` of the group's previous notification."""
    at = now + rule.group_wait
    if last_notified_at is not None:
        at = max(at, last_notified_at + rule.repeat_interval)
    return at


def open_key(rule: str, key: str) -> str:
    return f"{rule}|{key}"


def evaluate_batch(
    sessions: SessionFactory,
    rules: RuleSet,
    *,
    owner: str,
    now: datetime,
    limit: int = 100,
    lease: timedelta = timedelta(minutes=5),
) -> EvaluationResult:
    """Evaluate up to ``limit`` classified articles; one transaction per article."""
    claimed = claim(
        sessions, Article,
        where=[col(Article.status) == ArticleStatus.CLASSIFIED], order_by=[col(Article.id)],
        limit=limit, owner=owner, lease=lease, now=now,
    )  # fmt: skip
    total = EvaluationResult()
    for article in claimed:
        assert article.id is not None
        total.add(_evaluate_one(sessions, rules, article.id, owner, now))
    return total


def _evaluate_one(
    sessions: SessionFactory, rules: RuleSet, article_id: int, owner: str, now: datetime
) -> EvaluationResult:
    for attempt in range(3):
        result = EvaluationResult()
        try:
            with transaction(sessions) as session:
                begin_write(session)  # SQLite: the group's alert cannot change under us
                article = still_owned(session, Article, article_id, owner)
                if article is None:
                    result.lost_leases += 1
                    return result
                facts = facts_for(session, article)
                for rule in rules:
                    if rule_matches(rule, facts):
                        outcome = record_match(session, rule, facts, now)
                        result.matches[rule.name] += 1
                        if outcome == OPENED:
                            result.opened[rule.name] += 1
                        elif outcome == SILENCED:
                            result.silenced[rule.name] += 1
                article.status = ArticleStatus.EVALUATED
                release(article)
                session.add(article)
            result.articles = 1
            return result
        except IntegrityError:
            # Another replica opened the same group at the same moment: join it on retry.
            if attempt == 2:
                raise
            log.info("alert group opened concurrently; retrying", extra={"article_id": article_id})
    raise AssertionError("unreachable")


def _locked(session: Session, stmt: sa.Select[Any]) -> Alert | None:
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalars().first()


def _append(alert: Alert, article_id: int) -> None:
    if article_id not in alert.article_ids:
        alert.article_ids = [*alert.article_ids, article_id]  # a new list: JSON is not tracked


def record_match(session: Session, rule: Rule, facts: ArticleFacts, now: datetime) -> str:
    """Add the article to its group's alert; returns ``opened``, ``joined`` or ``silenced``."""
    key = group_key(rule, facts)
    story_id = facts.story_id if "story" in rule.group_by else None
    silence = active_silence(session, rule.name, facts.story_id, now)
    if silence is not None:
        held = _locked(
            session,
            sa.select(Alert).where(
                col(Alert.rule) == rule.name, col(Alert.group_key) == key,
                col(Alert.status) == SILENCED, col(Alert.silence_id) == silence.id,
            ).order_by(col(Alert.id).desc()).limit(1),
        )  # fmt: skip
        if held is None:
            held = Alert(
                rule=rule.name, group_key=key, severity=rule.severity, story_id=story_id,
                article_ids=[], fired_at=now, status=SILENCED, silence_id=silence.id,
            )  # fmt: skip
        _append(held, facts.article_id)
        session.add(held)
        return SILENCED
    okey = open_key(rule.name, key)
    pending = _locked(session, sa.select(Alert).where(col(Alert.open_key) == okey))
    if pending is not None:
        _append(pending, facts.article_id)
        session.add(pending)
        return JOINED
    last_notified = session.execute(
        sa.select(sa.func.max(col(Alert.notified_at))).where(
            col(Alert.rule) == rule.name, col(Alert.group_key) == key,
            col(Alert.status) == "notified",
        )
    ).scalar()  # fmt: skip
    alert = Alert(
        rule=rule.name, group_key=key, severity=rule.severity, story_id=story_id,
        article_ids=[facts.article_id], fired_at=now, status="pending",
        notify_at=next_notify_at(now, rule, last_notified), open_key=okey,
    )  # fmt: skip
    session.add(alert)
    session.flush()  # a concurrent open of the same group fails here (unique open_key)
    return OPENED


def pending_evaluation(session: Session) -> int:
    return int(
        session.execute(
            sa.select(sa.func.count())
            .select_from(Article)
            .where(col(Article.status) == ArticleStatus.CLASSIFIED)
        ).scalar()
        or 0
    )
