"""``coalition-watch alerts …``: check rules, silences, the outbox, test sends, backtests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import sqlalchemy as sa
import typer
from sqlmodel import col

from alerts.backtest import backtest
from alerts.notification import Notification
from alerts.notifiers import DeliveryError, NotifierDeps, Outgoing, build_notifier
from alerts.outbox import retry_delivery
from alerts.rules import RulesError, RuleSet, format_duration, load_rules, parse_duration
from alerts.silences import create_silence, expire_silence, list_silences
from service.context import AppContext
from storage.db import transaction
from storage.models import Alert, Delivery

alerts_app = typer.Typer(help="Alert rules, silences and deliveries.", no_args_is_help=True)


def _ctx() -> AppContext:
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    return ctx


def _load(path: Path | None) -> tuple[Path, RuleSet | None, list[str]]:
    from service.cli import settings

    options = settings().alerts
    path = path or options.rules_path()
    try:
        return path, load_rules(path, options.target_names), []
    except RulesError as exc:
        return path, None, exc.errors


def require_valid_rules() -> None:
    """Used by ``run``: refuse to start on invalid rules, printing every error."""
    path, rules, errors = _load(None)
    if rules is None:
        typer.echo(f"invalid alert rules in {path}:", err=True)
        for error in errors:
            typer.echo(f"  {error}", err=True)
        typer.echo("fix them (check with `coalition-watch alerts check`)", err=True)
        raise typer.Exit(2)


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@alerts_app.command("check")
def check_cmd(
    file: Annotated[
        Path | None, typer.Argument(help="Rules file (default: the alerts.rules setting).")
    ] = None,
) -> None:
    """Validate a rules file; print every error (exit 1) or a summary of the rules."""
    path, rules, errors = _load(file)
    if rules is None:
        typer.echo(f"{path}: {len(errors)} error(s)")
        for error in errors:
            typer.echo(f"  {error}")
        raise typer.Exit(1)
    typer.echo(f"{path}: {len(rules)} rule(s), valid")
    for rule in rules:
        targets = ", ".join(rule.targets) if rule.targets is not None else "all targets"
        typer.echo(
            f"  {rule.name} [{rule.severity}] group_by={'+'.join(rule.group_by)} "
            f"group_wait={format_duration(rule.group_wait)} "
            f"repeat_interval={format_duration(rule.repeat_interval)} → {targets}"
        )


@alerts_app.command("silence")
def silence_cmd(
    rule: Annotated[str, typer.Option("--rule", help="Rule name to silence.")],
    duration: Annotated[str, typer.Option("--for", help="How long: 30m, 6h, 2d…")],
    story: Annotated[int | None, typer.Option("--story", help="Only this story id.")] = None,
    comment: Annotated[str | None, typer.Option("--comment", help="Why.")] = None,
) -> None:
    """Silence a rule (or one story of it): matches are recorded, not delivered."""
    ctx = _ctx()
    _path, rules, _errors = _load(None)
    if rules is not None and rules.get(rule) is None:
        known = ", ".join(r.name for r in rules) or "none"
        typer.echo(f"unknown rule {rule!r} (rules: {known})", err=True)
        raise typer.Exit(1)
    try:
        length = parse_duration(duration)
        with transaction(ctx.sessions) as session:
            silence = create_silence(
                session, rule=rule, story_id=story, duration=length, now=ctx.clock(),
                comment=comment, created_by="cli",
            )  # fmt: skip
            sid, until = silence.id, silence.ends_at
    except ValueError as exc:
        typer.echo(f"--for: {exc}", err=True)
        raise typer.Exit(1) from exc
    scope = f"story {story} of rule {rule}" if story is not None else f"rule {rule}"
    typer.echo(f"silence {sid}: {scope} until {_when(until)} UTC")


@alerts_app.command("silences")
def silences_cmd(
    show_all: Annotated[bool, typer.Option("--all", help="Include expired silences.")] = False,
) -> None:
    """List active silences (all with --all)."""
    ctx = _ctx()
    now = ctx.clock()
    with ctx.sessions() as session:
        rows = list_silences(session, now, include_expired=show_all)
    if not rows:
        typer.echo("no silences" if show_all else "no active silences")
        return
    for s in rows:
        state = "active" if s.starts_at <= now < s.ends_at else "expired"
        story = f"story {s.story_id}" if s.story_id is not None else "all stories"
        typer.echo(
            f"{s.id:>5}  {state:<7}  {s.rule}  {story}  until {_when(s.ends_at)}"
            + (f"  — {s.comment}" if s.comment else "")
        )


@alerts_app.command("expire")
def expire_cmd(silence_id: Annotated[int, typer.Argument(help="Silence id.")]) -> None:
    """End a silence now."""
    ctx = _ctx()
    with transaction(ctx.sessions) as session:
        silence = expire_silence(session, silence_id, ctx.clock())
    if silence is None:
        typer.echo(f"no silence with id {silence_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"silence {silence_id} expired")


@alerts_app.command("deliveries")
def deliveries_cmd(
    failed: Annotated[
        bool, typer.Option("--failed", help="Only dead-lettered or failing deliveries.")
    ] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """The outbox: each delivery's status, attempts, next attempt and last error."""
    ctx = _ctx()
    stmt = (
        sa.select(Delivery, col(Alert.rule))
        .join(Alert, col(Alert.id) == col(Delivery.alert_id))
        .order_by(col(Delivery.id).desc())
        .limit(limit)
    )
    if failed:
        stmt = stmt.where(
            sa.or_(
                col(Delivery.status) == "dead",
                sa.and_(col(Delivery.status) == "pending", col(Delivery.last_error).is_not(None)),
            )
        )
    with ctx.sessions() as session:
        rows = session.execute(stmt).all()
    if as_json:
        out: list[dict[str, Any]] = [
            {
                "id": d.id, "alert_id": d.alert_id, "rule": rule, "target": d.target,
                "kind": d.target_kind, "status": d.status, "attempts": d.attempts,
                "next_attempt_at": d.next_attempt_at.isoformat(),
                "sent_at": d.sent_at.isoformat() if d.sent_at else None,
                "last_error": d.last_error, "idempotency_key": d.idempotency_key,
            }
            for d, rule in rows
        ]  # fmt: skip
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    if not rows:
        typer.echo("no failed deliveries" if failed else "no deliveries")
        return
    for d, rule in rows:
        when = _when(d.sent_at) if d.status == "sent" else f"next {_when(d.next_attempt_at)}"
        if d.status == "dead":
            when = "dead"
        line = (
            f"{d.id:>6}  {d.status:<7} {d.target} ({d.target_kind})  alert {d.alert_id} "
            f"[{rule}]  attempts {d.attempts}  {when}"
        )
        typer.echo(line)
        if d.last_error:
            typer.echo(f"        last error: {d.last_error}")


@alerts_app.command("retry")
def retry_cmd(delivery_id: Annotated[int, typer.Argument(help="Delivery id.")]) -> None:
    """Send a dead or waiting delivery again at the next deliver run (fresh deadline)."""
    ctx = _ctx()
    with transaction(ctx.sessions) as session:
        row = retry_delivery(session, delivery_id, ctx.clock(), ctx.settings.alerts.retry.max_age)
        status = row.status if row is not None else None
    if status is None:
        typer.echo(f"no delivery with id {delivery_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"delivery {delivery_id} queued for the next deliver run")


@alerts_app.command("test-notify")
def test_notify_cmd(target: Annotated[str, typer.Argument(help="Target name.")]) -> None:
    """Send a test notification to one target now and report the result."""
    from service.cli import settings

    options = settings().alerts
    chosen = options.target(target)
    if chosen is None:
        known = ", ".join(options.target_names) or "none configured"
        typer.echo(f"unknown target {target!r} (targets: {known})", err=True)
        raise typer.Exit(1)
    now = datetime.now(UTC)
    note = Notification(
        id=f"cw-test-{uuid.uuid4().hex[:16]}",
        type="alert.test",
        alert_id=None,
        rule="test-notify",
        rule_description="A test notification from `coalition-watch alerts test-notify`.",
        severity="info",
        group_key="test",
        fired_at=now,
        notified_at=now,
        story=None,
        articles=(),
    )

    async def send() -> str:
        async with httpx.AsyncClient() as http:
            notifier = build_notifier(chosen, NotifierDeps(http=http))
            return await notifier.send(Outgoing(note.id, [note]))

    started = time.perf_counter()
    try:
        receipt = asyncio.run(send())
    except DeliveryError as exc:
        kind = "permanent error" if exc.permanent else "temporary error (would be retried)"
        typer.echo(f"{target} ({chosen.kind}): {kind}: {exc}", err=True)
        raise typer.Exit(1) from exc
    elapsed = time.perf_counter() - started
    typer.echo(f"{target} ({chosen.kind}): ok, {receipt} in {elapsed:.2f}s (id {note.id})")


@alerts_app.command("backtest")
def backtest_cmd(
    since: Annotated[
        str | None, typer.Option("--since", help="Only articles fetched since (YYYY-MM-DD).")
    ] = None,
    rules_file: Annotated[
        Path | None, typer.Option("--rules", help="Rules file (default: the configured one).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Run the rules over stored history; print what would have fired, per rule.

    Writes and sends nothing.
    """
    ctx = _ctx()
    path, rules, errors = _load(rules_file)
    if rules is None:
        typer.echo(f"{path}: {len(errors)} error(s)", err=True)
        for error in errors:
            typer.echo(f"  {error}", err=True)
        raise typer.Exit(1)
    start: datetime | None = None
    if since:
        try:
            start = datetime.fromisoformat(since)
        except ValueError as exc:
            typer.echo(f"--since: {since!r} is not a date (YYYY-MM-DD)", err=True)
            raise typer.Exit(1) from exc
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
    with ctx.sessions() as session:
        report = backtest(session, rules, since=start)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), ensure_ascii=False, indent=2))
        return
    scope = f" since {start.date().isoformat()}" if start else ""
    typer.echo(f"backtest of {path} over {report.articles} classified articles{scope}")
    for name, r in report.rules.items():
        delivered = r.delivered
        silenced = len(r.notifications) - len(delivered)
        typer.echo(
            f"\n{name}: {r.matched} matching article(s) → {len(delivered)} notification(s)"
            + (f", {silenced} silenced" if silenced else "")
        )
        for n in r.notifications:
            story = f"story {n.story_id}" if n.story_id is not None else n.group_key
            mark = f"  (silenced by {n.silenced_by})" if n.silenced_by else ""
            typer.echo(f"  {_when(n.notify_at)}  {story}: {len(n.article_ids)} article(s){mark}")
            for article_id, title in zip(n.article_ids, n.titles, strict=True):
                typer.echo(f"      [{article_id}] {title}")
