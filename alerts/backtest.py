"""Backtest: run rules over stored history, in arrival order, and say what would have fired.

Nothing is written and nothing is sent. Each classified article is taken at the time it was
fetched; story facts are reconstructed as of that moment (first article of its story, distinct
outlets so far); grouping follows the live timers (``group_wait``, ``repeat_interval``) and the
stored silences that were active at the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session, col

from alerts.evaluate import next_notify_at
from alerts.match import facts_for, group_key, rule_matches
from alerts.rules import Rule, RuleSet
from alerts.silences import active_silence
from storage.models import Article, ArticleStatus, Classification


@dataclass
class WouldFire:
    rule: str
    group_key: str
    story_id: int | None
    first_match_at: datetime
    notify_at: datetime
    article_ids: list[int] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    silenced_by: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "group_key": self.group_key,
            "story_id": self.story_id,
            "first_match_at": self.first_match_at.isoformat(),
            "notify_at": self.notify_at.isoformat(),
            "article_ids": self.article_ids,
            "titles": self.titles,
            "silenced_by": self.silenced_by,
        }


@dataclass
class RuleReport:
    rule: str
    matched: int = 0
    notifications: list[WouldFire] = field(default_factory=list)

    @property
    def delivered(self) -> list[WouldFire]:
        return [n for n in self.notifications if n.silenced_by is None]


@dataclass
class BacktestReport:
    articles: int
    since: datetime | None
    rules: dict[str, RuleReport]

    def as_dict(self) -> dict[str, Any]:
        return {
            "articles": self.articles,
            "since": self.since.isoformat() if self.since else None,
            "rules": {
                name: {
                    "matched": r.matched,
                    "notifications": [n.as_dict() for n in r.notifications],
                }
                for name, r in self.rules.items()
            },
        }


@dataclass
class _Group:
    open: WouldFire | None = None
    last_notified: datetime | None = None
    silenced: dict[int, WouldFire] = field(default_factory=dict)


def backtest(session: Session, rules: RuleSet, *, since: datetime | None = None) -> BacktestReport:
    """What ``rules`` would have notified for the classified articles fetched since ``since``."""
    stmt = (
        sa.select(Article)
        .where(
            col(Article.status).in_([ArticleStatus.CLASSIFIED, ArticleStatus.EVALUATED]),
            sa.exists().where(col(Classification.article_id) == col(Article.id)),
        )
        .order_by(col(Article.fetched_at), col(Article.id))
    )
    if since is not None:
        stmt = stmt.where(col(Article.fetched_at) >= since)
    reports = {r.name: RuleReport(r.name) for r in rules}
    groups: dict[tuple[str, str], _Group] = {}
    count = 0
    for article in session.execute(stmt).scalars():
        count += 1
        facts = facts_for(session, article, history=True)
        at = article.fetched_at
        for rule in rules:
            if not rule_matches(rule, facts):
                continue
            report = reports[rule.name]
            report.matched += 1
            key = group_key(rule, facts)
            group = groups.setdefault((rule.name, key), _Group())
            _close_if_due(session, group, at, report)
            silence = active_silence(session, rule.name, facts.story_id, at)
            if silence is not None and silence.id is not None:
                target = group.silenced.get(silence.id)
                if target is None:
                    target = _open(rule, key, facts.story_id, at, group)
                    target.silenced_by = silence.id
                    group.silenced[silence.id] = target
                    report.notifications.append(target)
            else:
                if group.open is None:
                    group.open = _open(rule, key, facts.story_id, at, group)
                target = group.open
            target.article_ids.append(facts.article_id)
            target.titles.append(article.title)
    for (rule_name, _key), group in groups.items():
        if group.open is not None:
            _close(session, group, reports[rule_name])
    session.rollback()  # read-only, whatever happened
    for report in reports.values():
        report.notifications.sort(key=lambda n: (n.notify_at, n.group_key))
    return BacktestReport(count, since, reports)


def _open(rule: Rule, key: str, story_id: int | None, at: datetime, group: _Group) -> WouldFire:
    by_story = story_id if "story" in rule.group_by else None
    return WouldFire(rule.name, key, by_story, at, next_notify_at(at, rule, group.last_notified))


def _close_if_due(session: Session, group: _Group, at: datetime, report: RuleReport) -> None:
    if group.open is not None and group.open.notify_at <= at:
        _close(session, group, report)


def _close(session: Session, group: _Group, report: RuleReport) -> None:
    fire = group.open
    assert fire is not None
    group.open = None
    silence = active_silence(session, fire.rule, fire.story_id, fire.notify_at)
    if silence is not None:
        fire.silenced_by = silence.id
    else:
        group.last_notified = fire.notify_at
    report.notifications.append(fire)
