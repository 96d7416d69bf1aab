"""``coalition-watch feeds …`` and ``coalition-watch collect``: manage and poll feeds."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlmodel import col, select

from collectors.feeds import (
    FeedExists,
    FeedOptions,
    PollResult,
    Probe,
    add_feed,
    feed_state,
    find_feed,
    normalize_feed_url,
    parse_file,
    probe,
)
from collectors.fetch import Fetcher, make_http_client
from collectors.opml import OpmlError, OpmlFeed, read_opml, write_opml
from collectors.parse import FeedProblem, ParsedFeed
from collectors.schedule import fmt_duration, parse_duration
from storage.db import transaction
from storage.models import Article, Feed, utcnow

feeds_app = typer.Typer(
    help="RSS/Atom feeds: add, list, remove, check, OPML import/export.", no_args_is_help=True
)

MIN_FIXED_INTERVAL = 60


def _when(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    delta = (moment - now).total_seconds()
    if abs(delta) < 30:
        return "now"
    return f"in {fmt_duration(delta)}" if delta > 0 else f"{fmt_duration(-delta)} ago"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _feed_json(feed: Feed, options: FeedOptions) -> dict[str, Any]:
    return {
        "id": feed.id,
        "url": feed.url,
        "title": feed.title,
        "site_url": feed.site_url,
        "language": feed.language,
        "status": feed_state(feed, options.unhealthy_after),
        "enabled": feed.enabled,
        "unhealthy": feed.consecutive_failures >= options.unhealthy_after,
        "consecutive_failures": feed.consecutive_failures,
        "last_checked_at": _iso(feed.last_checked_at),
        "last_success_at": _iso(feed.last_success_at),
        "last_new_entry_at": _iso(feed.last_new_entry_at),
        "next_check_at": _iso(feed.next_check_at),
        "next_check_reason": feed.next_check_reason,
        "interval": feed.interval,
        "interval_fixed": feed.interval_fixed,
        "publish_interval": feed.publish_interval,
        "last_error_kind": feed.last_error_kind,
        "last_error": feed.last_error,
        "last_warning": feed.last_warning,
    }


@feeds_app.command("add")
def add_cmd(
    url: Annotated[str, typer.Argument(help="Feed URL, or a web page that announces its feed.")],
    interval: Annotated[
        str | None,
        typer.Option(help="Fixed interval (900, 15m, 2h); default: adaptive from 15 min."),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Title (default: the feed's own).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Add without checking the URL first.")
    ] = False,
) -> None:
    """Add a feed. A web page is accepted when it announces its feed (<link rel=alternate>)."""
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    options = ctx.settings.feeds
    try:
        url = normalize_feed_url(url)
        seconds = parse_duration(interval) if interval else None
    except ValueError as exc:
        typer.echo(f"feeds add: {exc}", err=True)
        raise typer.Exit(2) from exc
    if seconds is not None and seconds < MIN_FIXED_INTERVAL:
        typer.echo(f"feeds add: --interval must be at least {MIN_FIXED_INTERVAL} s", err=True)
        raise typer.Exit(2)
    with ctx.sessions() as session:
        existing = find_feed(session, url)
    if existing is not None:
        typer.echo(f"{existing.url} is already feed #{existing.id}: nothing to do")
        return
    if not force:
        checked = asyncio.run(_probe(options, url))
        url, title = _judge_probe(checked, url, title)
    try:
        with transaction(ctx.sessions) as session:
            feed = add_feed(session, url, options, ctx.clock(), interval=seconds, title=title)
            feed_id = feed.id
    except FeedExists as exc:
        typer.echo(f"{exc}: nothing to do")
        return
    schedule = f"every {fmt_duration(seconds)} (fixed)" if seconds else "adaptive schedule"
    typer.echo(f"added feed #{feed_id}: {url} ({schedule}); first check at the next poll")


async def _probe(options: FeedOptions, url: str) -> Probe:
    async with make_http_client(options) as client:
        return await probe(Fetcher(client, options), url, utcnow())


def _judge_probe(checked: Probe, url: str, title: str | None) -> tuple[str, str | None]:
    """Decide from a probe whether (and which URL) to add; exits on a hopeless URL."""
    if checked.parsed is not None:
        if checked.fetch is not None and checked.fetch.permanent_url:
            typer.echo(f"{checked.fetch.url} moved permanently to {checked.fetch.permanent_url}")
        if checked.discovered_from:
            typer.echo(
                f"{checked.discovered_from} is a web page; it announces the feed {checked.url}"
            )
        entries = len(checked.parsed.entries)
        typer.echo(
            f"found a {checked.parsed.version} feed “{checked.parsed.title or '-'}” "
            f"with {entries} entries"
        )
        for warning in checked.parsed.warnings:
            typer.echo(f"  warning: {warning}")
        return checked.url, title or checked.parsed.title
    fetched = checked.fetch
    if checked.network_error and fetched is not None:
        typer.echo(
            f"warning: cannot check {url} now ({fetched.error_kind}: {fetched.error}); "
            "adding it anyway: it will be polled and retried like any feed",
            err=True,
        )
        return url, title
    message = checked.problem.message if checked.problem else (fetched.error if fetched else "")
    typer.echo(f"feeds add: {message}", err=True)
    if checked.problem is not None and not checked.problem.discovered:
        typer.echo("(the page announces no feed; use --force to add the URL anyway)", err=True)
    raise typer.Exit(1)


@feeds_app.command("list")
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
) -> None:
    """Every feed: status, last success, failures in a row, next check and why."""
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    options = ctx.settings.feeds
    now = ctx.clock()
    with ctx.sessions() as session:
        feeds = list(session.exec(select(Feed).order_by(col(Feed.id))))
    if as_json:
        typer.echo(
            json.dumps([_feed_json(f, options) for f in feeds], ensure_ascii=False, indent=2)
        )
        return
    if not feeds:
        typer.echo("no feeds yet: `coalition-watch feeds add URL` or `feeds import FILE.opml`")
        return
    states: dict[str, int] = {}
    for feed in feeds:
        state = feed_state(feed, options.unhealthy_after)
        states[state] = states.get(state, 0) + 1
        label = state.upper() if state == "unhealthy" else state
        typer.echo(f"#{feed.id:<4} {label:<10} {feed.url}")
        details = [
            feed.title or "(no title yet)",
            f"last success {_when(feed.last_success_at, now)}",
            f"{feed.consecutive_failures} failure{'' if feed.consecutive_failures == 1 else 's'}"
            " in a row",
        ]
        typer.echo("      " + " · ".join(details))
        reason = f": {feed.next_check_reason}" if feed.next_check_reason else ""
        typer.echo(f"      next check {_when(feed.next_check_at, now)}{reason}")
        if feed.consecutive_failures and feed.last_error:
            typer.echo(f"      error ({feed.last_error_kind}): {feed.last_error}")
        if feed.last_warning:
            typer.echo(f"      warning: {feed.last_warning}")
    order = ("ok", "new", "failing", "unhealthy", "disabled")
    summary = ", ".join(f"{states[s]} {s}" for s in order if states.get(s))
    typer.echo(f"{len(feeds)} feeds: {summary}")


@feeds_app.command("remove")
def remove_cmd(
    url_or_id: Annotated[str, typer.Argument(help="The feed's URL or #id.")],
) -> None:
    """Stop watching a feed. Its stored articles are kept."""
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    with transaction(ctx.sessions) as session:
        feed = find_feed(session, url_or_id)
        if feed is None:
            typer.echo(f"feeds remove: no feed {url_or_id!r} (see `feeds list`)", err=True)
            raise typer.Exit(1)
        kept = len(session.exec(select(Article.id).where(Article.feed_id == feed.id)).all())
        feed_id, url = feed.id, feed.url
        session.delete(feed)
    typer.echo(f"removed feed #{feed_id} {url} ({kept} stored articles kept)")


@feeds_app.command("import")
def import_cmd(
    file: Annotated[Path, typer.Argument(help="OPML file.")],
    if_empty: Annotated[
        bool, typer.Option("--if-empty", help="Import only when no feed is configured yet.")
    ] = False,
) -> None:
    """Add every feed of an OPML file (nested outlines too); feeds already present are kept."""
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    options = ctx.settings.feeds
    if if_empty:
        with ctx.sessions() as session:
            present = len(session.exec(select(Feed.id)).all())
        if present:
            typer.echo(f"{present} feeds already configured: {file} not imported (--if-empty)")
            return
    try:
        doc = read_opml(file.read_bytes(), str(file))
    except OSError as exc:
        typer.echo(f"feeds import: cannot read {file}: {exc}", err=True)
        raise typer.Exit(1) from exc
    except OpmlError as exc:
        typer.echo(f"feeds import: {exc}", err=True)
        raise typer.Exit(1) from exc
    for warning in doc.warnings:
        typer.echo(f"warning: {warning}", err=True)
    added = present_count = 0
    now = ctx.clock()
    with transaction(ctx.sessions) as session:
        for item in doc.feeds:
            try:
                add_feed(session, item.url, options, now, title=item.title)
                added += 1
            except FeedExists:
                present_count += 1
    for bad in doc.invalid:
        typer.echo(
            f"warning: {file}: skipped an outline whose xmlUrl is not http(s): {bad}", err=True
        )
    typer.echo(
        f"imported {added} feeds from {file} ({present_count} already present, "
        f"{len(doc.invalid)} invalid)"
    )


@feeds_app.command("export")
def export_cmd() -> None:
    """Print every feed as OPML 2.0."""
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    with ctx.sessions() as session:
        feeds = list(session.exec(select(Feed).order_by(col(Feed.id))))
    items = [OpmlFeed(url=f.url, title=f.title, site_url=f.site_url) for f in feeds]
    typer.echo(write_opml(items, title="coalition-watch feeds", now=ctx.clock()), nl=False)


@feeds_app.command("check")
def check_cmd(
    target: Annotated[str, typer.Argument(help="A feed URL or a feed file.")],
    entries: Annotated[int, typer.Option(help="How many entry titles to show.")] = 5,
) -> None:
    """Fetch (or read) and parse a feed; print what a poll would store and every problem.

    Writes nothing."""
    from service.cli import settings

    options = settings().feeds
    path = Path(target)
    now = utcnow()
    parsed: ParsedFeed | None = None
    problem: str | None = None
    discovered: list[str] = []
    if path.is_file():
        data = path.read_bytes()
        typer.echo(f"file:     {path} ({len(data):,} bytes)")
        try:
            parsed = parse_file(data, str(path), now)
        except FeedProblem as exc:
            problem, discovered = f"{exc.kind}: {exc.message}", exc.discovered
    else:
        try:
            url = normalize_feed_url(target)
        except ValueError as exc:
            typer.echo(f"feeds check: {target!r} is neither a file nor an http(s) URL", err=True)
            raise typer.Exit(2) from exc
        started = time.monotonic()
        checked = asyncio.run(_probe_only(options, url))
        _print_fetch(checked, time.monotonic() - started)
        parsed = checked.parsed
        if checked.problem is not None:
            problem, discovered = (
                f"{checked.problem.kind}: {checked.problem.message}",
                (checked.problem.discovered),
            )
        elif checked.fetch is not None and checked.fetch.error_kind:
            problem = f"{checked.fetch.error_kind}: {checked.fetch.error}"
    if parsed is not None:
        _print_parsed(parsed, entries)
    if problem:
        typer.echo(f"error:    {problem}")
        for url in discovered:
            typer.echo(f"          announced feed: {url}")
        raise typer.Exit(1)


async def _probe_only(options: FeedOptions, url: str) -> Probe:
    async with make_http_client(options) as client:
        return await probe(Fetcher(client, options), url, utcnow(), discover=False)


def _print_fetch(checked: Probe, seconds: float) -> None:
    fetched = checked.fetch
    if fetched is None:
        return
    typer.echo(f"url:      {fetched.url}")
    for status, location in fetched.redirects:
        typer.echo(f"redirect: HTTP {status} → {location}")
    if fetched.permanent_url:
        typer.echo(f"moved:    permanently to {fetched.permanent_url} (a poll stores the new URL)")
    if fetched.status is not None:
        size = f", {len(fetched.body):,} bytes" if fetched.body is not None else ""
        ctype = fetched.headers.get("content-type", "no content type")
        sniffed = (
            f", {fetched.decompressed} body inflated by magic bytes" if fetched.decompressed else ""
        )
        typer.echo(f"http:     {fetched.status} ({ctype}{size}{sniffed}) in {seconds:.2f} s")
    validators = [h for h in ("etag", "last-modified") if h in fetched.headers]
    if validators:
        typer.echo(f"cache:    {', '.join(validators)} (conditional polls possible)")


def _print_parsed(parsed: ParsedFeed, shown: int) -> None:
    typer.echo(f"format:   {parsed.version}")
    typer.echo(f"title:    {parsed.title or '-'}")
    typer.echo(f"site:     {parsed.site_url or '-'}")
    typer.echo(f"language: {parsed.language or '- (detected per entry)'}")
    if parsed.ttl_seconds:
        typer.echo(f"ttl:      {fmt_duration(parsed.ttl_seconds)}")
    skipped = f" ({parsed.skipped} empty skipped)" if parsed.skipped else ""
    typer.echo(f"entries:  {len(parsed.entries)}{skipped}")
    for i, entry in enumerate(parsed.entries[:shown], 1):
        date = entry.published_at.strftime("%Y-%m-%d %H:%M")
        typer.echo(f"  {i:>2}. {entry.title}")
        typer.echo(
            f"      {date} ({entry.published_source}) · {entry.language or '--'} · "
            f"{entry.url or 'no link'}"
        )
    problems = parsed.warnings + parsed.notes
    if problems:
        typer.echo("problems:")
        for line in problems:
            typer.echo(f"  - {line}")
    else:
        typer.echo("problems: none")


def collect_cmd(
    once: Annotated[
        bool, typer.Option("--once", help="Poll every due feed once, print a summary, exit.")
    ] = False,
) -> None:
    """Poll the due feeds (with --once: one pass; otherwise until Ctrl-C)."""
    from service.cli import context, require_schema
    from service.jobs import free_dead_leases, run_collect

    ctx = context()
    require_schema(ctx)
    free_dead_leases(ctx, own_id_is_free=not ctx.settings.instance_id)
    try:
        while True:
            result = asyncio.run(run_collect(ctx))
            _print_poll(result, ctx.clock())
            if once:
                return
            time.sleep(ctx.settings.feeds.job_interval)
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        ctx.close()


def _print_poll(result: PollResult, now: datetime) -> None:
    for poll in result.polls:
        if poll.moved_to:
            typer.echo(f"  moved   #{poll.feed_id} now at {poll.moved_to} (permanent redirect)")
        if poll.failed:
            typer.echo(
                f"  failed  #{poll.feed_id} {poll.url}: {poll.outcome}: {poll.error} "
                f"(next check {_when(poll.next_check_at, now)})"
            )
        elif poll.counts.added or poll.counts.updated:
            typer.echo(
                f"  ok      #{poll.feed_id} {poll.url}: {poll.counts.added} added, "
                f"{poll.counts.updated} updated, {poll.counts.duplicates} duplicates"
            )
    typer.echo(result.summary())
