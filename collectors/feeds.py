"""RSS/Atom/RDF (and JSON Feed) collection: claim due feeds → fetch → parse → store.

The collector keeps up with thousands of feeds without babysitting:

- **fetch** (:mod:`collectors.fetch`): one injected ``httpx.AsyncClient``, global and per-host
  limits, timeouts, a body cap, manual redirects (a 301/308 moves the stored URL), gzip by
  magic bytes, conditional GET with the stored ETag/Last-Modified, and an unconditional
  fetch every N-th poll because some servers keep an ETag after the content changed;
- **parse** (:mod:`collectors.parse`): feedparser on the bytes and headers, tolerant (what
  it recovers is kept, the problem recorded as a warning), HTML pages are "not a feed";
- **store**: one article per (feed, guid); an entry already stored from another feed (same
  canonical URL or same content) is stored once; a known guid with changed text updates its
  article (same id, ``updated_at`` set, status back to ``new`` so it is classified again);
- **schedule** (:mod:`collectors.schedule`): the next check and its reason are kept on the
  feed; failures back off up to a cap, forever: a feed is never dropped or disabled, and it
  is reported unhealthy after ``unhealthy_after`` failures in a row.

Nothing here imports the service: the caller passes the client, the session factory, the
clock and the owner name for leases, and turns the returned :class:`PollResult` into metrics.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlmodel import Session, col, select

from collectors.base import Collector
from collectors.fetch import NOT_A_FEED, PARSE, Fetcher, FetchResult, sniff_decompress
from collectors.normalize import canonical_url
from collectors.parse import FROM_FIRST_SEEN, FeedProblem, ParsedEntry, ParsedFeed, parse_document
from collectors.schedule import NextCheck, after_failure, after_success, observed_entry_gap
from storage.claims import claim, release, still_owned
from storage.db import SessionFactory, serialize, transaction
from storage.models import Article, ArticleStatus, Feed

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Cross-feed dedup by content hash only for entries with this much text: two different
# stories may share a bare title ("Live updates") and nothing else.
MIN_TEXT_FOR_HASH_DEDUP = 80
# Cross-feed dedup cannot be a unique index (new = no article with this URL *or* this hash),
# so replicas on PostgreSQL take turns: check-and-insert runs under this advisory lock.
DEDUP_LOCK = "coalition-watch:article-dedup"
_IN_CHUNK = 500

# Feed states shown by `feeds list` and counted in the metrics.
NEW, OK, FAILING, UNHEALTHY, DISABLED = "new", "ok", "failing", "unhealthy", "disabled"


def _default_user_agent() -> str:
    try:
        version = metadata.version("coalition-watch")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        version = "dev"
    return f"coalition-watch/{version} (news monitor; RSS/Atom feed collector)"


class FeedOptions(BaseModel):
    """Settings of the feed collector: ``[feeds]`` in TOML, ``COALITION_WATCH_FEEDS__*``."""

    model_config = ConfigDict(extra="forbid")

    # Fetching.
    connect_timeout: float = Field(default=10.0, gt=0, description="seconds to connect")
    total_timeout: float = Field(default=30.0, gt=0, description="seconds for a whole fetch")
    max_body_bytes: int = Field(default=10_000_000, ge=1024, description="body cap (decoded)")
    max_redirects: int = Field(default=5, ge=0, le=20)
    user_agent: str = Field(default_factory=_default_user_agent, min_length=1)
    max_concurrency: int = Field(default=20, ge=1, description="fetches in flight")
    per_host_concurrency: int = Field(default=2, ge=1, description="fetches in flight per host")
    unconditional_every: int = Field(
        default=10, ge=0, description="every N-th poll ignores ETag/Last-Modified (0: never)"
    )
    # Schedule.
    default_interval: int = Field(default=900, ge=1, description="seconds between checks")
    min_interval: int = Field(default=300, ge=1, description="adaptive lower bound, seconds")
    max_interval: int = Field(default=86_400, ge=1, description="adaptive upper bound, seconds")
    adaptive: bool = Field(default=True, description="adapt intervals to the publishing rate")
    adaptive_factor: float = Field(
        default=0.5, gt=0, le=10, description="interval = factor × observed time between entries"
    )
    max_server_delay: int = Field(
        default=86_400, ge=1, description="cap on <ttl>, max-age and Retry-After, seconds"
    )
    # Failures.
    backoff_base: int = Field(default=300, ge=1, description="first retry delay, seconds")
    backoff_cap: int = Field(default=21_600, ge=1, description="longest retry delay, seconds")
    unhealthy_after: int = Field(default=10, ge=1, description="failures in a row → unhealthy")
    # Work sharing.
    job_interval: float = Field(default=30.0, gt=0, description="seconds between polling runs")
    claim_batch: int = Field(default=200, ge=1, description="feeds claimed at a time")
    lease_seconds: int = Field(default=600, ge=10, description="claim lease on a feed")
    max_text_chars: int = Field(default=100_000, ge=1000, description="article text cap")

    @model_validator(mode="after")
    def _coherent(self) -> FeedOptions:
        if not self.min_interval <= self.default_interval <= self.max_interval:
            raise ValueError(
                "feeds: need min_interval <= default_interval <= max_interval "
                f"(got {self.min_interval}, {self.default_interval}, {self.max_interval})"
            )
        if self.lease_seconds <= self.total_timeout:
            raise ValueError("feeds: lease_seconds must be longer than total_timeout")
        return self


# --- Results --------------------------------------------------------------------------------


@dataclass
class StoreCounts:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0


@dataclass
class FeedPoll:
    """What one poll of one feed did."""

    feed_id: int
    url: str
    outcome: str  # ok | not_modified | unchanged | lease_lost | an error kind
    fetch_seconds: float = 0.0
    conditional: bool = False
    counts: StoreCounts = field(default_factory=StoreCounts)
    skipped: int = 0
    error: str | None = None
    warning: str | None = None
    moved_to: str | None = None
    next_check_at: datetime | None = None
    next_check_reason: str | None = None
    failures: int = 0

    @property
    def failed(self) -> bool:
        return self.outcome not in ("ok", "not_modified", "unchanged", "lease_lost")


@dataclass
class PollResult:
    """A polling run: one :class:`FeedPoll` per feed, and the feeds' states afterwards."""

    polls: list[FeedPoll] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(p.outcome for p in self.polls)

    @property
    def added(self) -> int:
        return sum(p.counts.added for p in self.polls)

    @property
    def updated(self) -> int:
        return sum(p.counts.updated for p in self.polls)

    @property
    def duplicates(self) -> int:
        return sum(p.counts.duplicates for p in self.polls)

    @property
    def failed(self) -> list[FeedPoll]:
        return [p for p in self.polls if p.failed]

    @property
    def unhealthy(self) -> int:
        return self.states.get(UNHEALTHY, 0)

    def summary(self) -> str:
        o = self.outcomes
        errors = len(self.failed)
        return (
            f"polled {len(self.polls)} feeds: {o['ok']} ok, {o['not_modified']} not modified, "
            f"{o['unchanged']} unchanged, {errors} failed; entries: {self.added} added, "
            f"{self.updated} updated, {self.duplicates} duplicates skipped; "
            f"{self.unhealthy} feeds unhealthy"
        )


# --- Feed state -----------------------------------------------------------------------------


def state_of(enabled: bool, failures: int, checked: datetime | None, unhealthy_after: int) -> str:
    if not enabled:
        return DISABLED
    if failures >= unhealthy_after:
        return UNHEALTHY
    if failures > 0:
        return FAILING
    return NEW if checked is None else OK


def feed_state(feed: Feed, unhealthy_after: int) -> str:
    return state_of(feed.enabled, feed.consecutive_failures, feed.last_checked_at, unhealthy_after)


def count_states(session: Session, unhealthy_after: int) -> dict[str, int]:
    rows = session.execute(
        sa.select(col(Feed.enabled), col(Feed.consecutive_failures), col(Feed.last_checked_at))
    ).all()
    states: Counter[str] = Counter({NEW: 0, OK: 0, FAILING: 0, UNHEALTHY: 0, DISABLED: 0})
    for enabled, failures, checked in rows:
        states[state_of(enabled, failures, checked, unhealthy_after)] += 1
    return dict(states)


def feed_outlet(feed: Feed) -> str:
    return (feed.title or urlsplit(feed.site_url or feed.url).hostname or feed.url)[:256]


# --- Storing entries ------------------------------------------------------------------------


def article_uid(feed_id: int, guid: str) -> str:
    return f"feed:{feed_id}:{guid}"


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(values), _IN_CHUNK):
        yield values[i : i + _IN_CHUNK]


def _existing(session: Session, column: Any, values: Iterable[str]) -> set[str]:
    wanted = sorted({v for v in values if v})
    found: set[str] = set()
    for chunk in _chunks(wanted):
        found.update(session.execute(sa.select(column).where(column.in_(chunk))).scalars())
    return found


def store_entries(
    session: Session, feed: Feed, entries: Sequence[ParsedEntry], now: datetime
) -> StoreCounts:
    """Store a document's entries for ``feed`` (see the module doc for the dedup rules).

    When the document has entries this feed never stored, the cross-feed check and the insert
    run under the dedup lock (PostgreSQL), which the caller's transaction holds until it
    commits: keep that transaction short (fetching and parsing happen before it). A document
    with no new entry takes no lock: its entries are this feed's own, and the feed is leased.
    """
    assert feed.id is not None
    counts = StoreCounts()
    by_uid = {article_uid(feed.id, e.guid): e for e in entries}
    stored: dict[str, str] = {}  # uid -> content hash, for this feed's known entries
    uid_col, hash_col = col(Article.uid), col(Article.content_hash)
    for chunk in _chunks(list(by_uid)):
        rows = session.execute(sa.select(uid_col, hash_col).where(uid_col.in_(chunk)))
        stored.update((uid, digest) for uid, digest in rows)
    fresh = [e for uid, e in by_uid.items() if uid not in stored]
    if fresh:
        serialize(session, DEDUP_LOCK)  # from here to the commit: one replica at a time
    known_urls = _existing(session, col(Article.url), (e.url or "" for e in fresh))
    known_hashes = _existing(
        session, hash_col, (e.content_hash for e in fresh if len(e.text) >= MIN_TEXT_FOR_HASH_DEDUP)
    )
    outlet = feed_outlet(feed)
    changed: list[str] = []
    rows_to_add: list[dict[str, Any]] = []
    # Oldest first, so article ids follow the feed's own order of publication.
    for uid, entry in reversed(list(by_uid.items())):
        if uid in stored:
            if stored[uid] == entry.content_hash:
                counts.unchanged += 1
            else:
                changed.append(uid)
            continue
        hashed = len(entry.text) >= MIN_TEXT_FOR_HASH_DEDUP
        if (entry.url and entry.url in known_urls) or (
            hashed and entry.content_hash in known_hashes
        ):
            counts.duplicates += 1
            continue
        rows_to_add.append(
            {
                "uid": uid,
                "source": "feed",
                "feed_id": feed.id,
                "guid": entry.guid,
                "url": entry.url,
                "outlet": outlet,
                "title": entry.title,
                "text": entry.text,
                "language": entry.language,
                "published_at": entry.published_at,
                "published_source": entry.published_source,
                "fetched_at": now,
                "content_hash": entry.content_hash,
                "status": ArticleStatus.NEW,
            }
        )
        if entry.url:
            known_urls.add(entry.url)
        if hashed:
            known_hashes.add(entry.content_hash)
    if rows_to_add:
        # One multi-row INSERT: far cheaper than one ORM object per entry.
        session.execute(sa.insert(Article), rows_to_add)
        counts.added = len(rows_to_add)
    for chunk in _chunks(changed):
        for article in session.exec(select(Article).where(uid_col.in_(chunk))):
            _update(article, by_uid[article.uid], now)
            session.add(article)
            counts.updated += 1
    session.flush()
    return counts


def _update(article: Article, entry: ParsedEntry, now: datetime) -> None:
    """A known entry whose text changed: same article, new content, classified again."""
    article.title = entry.title
    article.text = entry.text
    article.url = entry.url or article.url
    article.language = entry.language or article.language
    article.content_hash = entry.content_hash
    if article.published_source == FROM_FIRST_SEEN and entry.published_source != FROM_FIRST_SEEN:
        article.published_at = entry.published_at
        article.published_source = entry.published_source
    article.updated_at = now
    article.status = ArticleStatus.NEW
    article.embedding = None
    release(article)


# --- The collector --------------------------------------------------------------------------


@dataclass
class _Fetched:
    fetch: FetchResult
    conditional: bool
    parsed: ParsedFeed | None = None
    problem: FeedProblem | None = None
    body_hash: str | None = None
    same_body: bool = False


class FeedCollector(Collector, kind="feeds"):
    """Polls due feeds. One instance per polling run; its limits hold across that run."""

    Options = FeedOptions

    def __init__(
        self,
        options: FeedOptions,
        *,
        client: httpx.AsyncClient,
        sessions: SessionFactory,
        clock: Clock,
        owner: str,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.fetcher = Fetcher(client, options)
        self.sessions = sessions
        self.clock = clock
        self.owner = owner
        self.rng = rng or random.Random()
        self._store_lock = asyncio.Lock()
        # Feeds between fetch and store at once: bounds the bodies held in memory.
        self._pipeline = asyncio.Semaphore(2 * options.max_concurrency)

    async def poll_due(self, *, stop: Callable[[], bool] | None = None) -> PollResult:
        """Poll every feed that is due, each at most once in this run."""
        result = PollResult()
        polled: set[int] = set()
        while not (stop and stop()):
            feeds = await asyncio.to_thread(self.claim_due, polled)
            if not feeds:
                break
            polled.update(f.id for f in feeds if f.id is not None)
            result.polls.extend(await asyncio.gather(*(self.poll_feed(f) for f in feeds)))
        result.states = await asyncio.to_thread(self.states)
        return result

    def claim_due(self, exclude: set[int] | None = None) -> list[Feed]:
        now = self.clock()
        where = [
            col(Feed.enabled).is_(True),
            sa.or_(col(Feed.next_check_at).is_(None), col(Feed.next_check_at) <= now),
        ]
        if exclude:
            where.append(col(Feed.id).not_in(sorted(exclude)))
        return claim(
            self.sessions,
            Feed,
            where=where,
            order_by=[col(Feed.next_check_at).asc().nulls_first(), col(Feed.id)],
            limit=self.options.claim_batch,
            owner=self.owner,
            lease=timedelta(seconds=self.options.lease_seconds),
            now=now,
        )

    def states(self) -> dict[str, int]:
        with self.sessions() as session:
            return count_states(session, self.options.unhealthy_after)

    async def poll_feed(self, feed: Feed) -> FeedPoll:
        """fetch → parse → store, for one claimed feed."""
        async with self._pipeline:
            try:
                fetched = await self.fetch(feed)
                if fetched.fetch.ok and not fetched.same_body:
                    await self.parse(fetched)
                async with self._store_lock:  # one writer: SQLite-friendly; dedup sees all rows
                    return await asyncio.to_thread(self.store, feed, fetched)
            except Exception as exc:  # a bug or a database outage: this feed only
                log.exception("feed poll crashed", extra={"feed_url": feed.url})
                assert feed.id is not None
                message = f"polling {feed.url} crashed: {type(exc).__name__}: {exc}"
                return FeedPoll(feed.id, feed.url, "internal_error", error=message)

    def _conditional(self, feed: Feed) -> bool:
        if not (feed.etag or feed.last_modified):
            return False
        every = self.options.unconditional_every
        return every == 0 or feed.polls_since_unconditional + 1 < every

    async def fetch(self, feed: Feed) -> _Fetched:
        conditional = self._conditional(feed)
        result = await self.fetcher.fetch(
            feed.url,
            etag=feed.etag if conditional else None,
            last_modified=feed.last_modified if conditional else None,
        )
        fetched = _Fetched(result, conditional)
        if result.ok and result.body is not None:
            fetched.body_hash = hashlib.sha256(result.body).hexdigest()
            fetched.same_body = fetched.body_hash == feed.body_hash
        return fetched

    async def parse(self, fetched: _Fetched) -> None:
        result = fetched.fetch
        assert result.body is not None
        try:
            fetched.parsed = await asyncio.to_thread(
                parse_document,
                result.body,
                result.headers,
                result.final_url,
                self.clock(),
                max_text_chars=self.options.max_text_chars,
            )
        except FeedProblem as problem:
            fetched.problem = problem
        except Exception as exc:  # the parser itself failed: a recorded error, not a crash
            message = f"parsing {result.final_url} failed: {type(exc).__name__}: {exc}"
            fetched.problem = FeedProblem(PARSE, message)

    def store(self, feed: Feed, fetched: _Fetched) -> FeedPoll:
        assert feed.id is not None
        now = self.clock()
        result = fetched.fetch
        poll = FeedPoll(feed.id, feed.url, "ok", result.elapsed, fetched.conditional)
        with transaction(self.sessions) as session:
            row = still_owned(session, Feed, feed.id, self.owner)
            if row is None:
                log.warning("feed lease lost: result dropped", extra={"feed_url": feed.url})
                poll.outcome = "lease_lost"
                return poll
            row.last_checked_at = now
            if result.error_kind is not None:
                schedule = self._failed(row, result.error_kind, result.error or "", result, now)
            elif fetched.problem is not None:
                problem = fetched.problem
                schedule = self._failed(row, problem.kind, problem.message, result, now)
            else:
                schedule = self._succeeded(session, row, fetched, poll, now)
            row.next_check_at = schedule.at
            row.next_check_reason = schedule.reason
            release(row)
            session.add(row)
            if row.consecutive_failures:
                poll.outcome = row.last_error_kind or "error"
                poll.error = row.last_error
            poll.warning = row.last_warning
            poll.failures = row.consecutive_failures
            poll.next_check_at, poll.next_check_reason = schedule.at, schedule.reason
            poll.url = row.url
        return poll

    def _failed(
        self, row: Feed, kind: str, message: str, result: FetchResult, now: datetime
    ) -> NextCheck:
        row.consecutive_failures += 1
        row.last_error_kind = kind
        row.last_error = message
        level = logging.WARNING
        if row.consecutive_failures == self.options.unhealthy_after:
            level = logging.ERROR
            message = f"{message} (now unhealthy: {row.consecutive_failures} failures in a row)"
        extra = {"feed_url": row.url, "error_kind": kind}
        log.log(level, "feed poll failed: %s", message, extra=extra)
        return after_failure(
            now,
            self.options,
            failures=row.consecutive_failures,
            kind=kind,
            retry_after=result.retry_after,
            rng=self.rng,
        )

    def _succeeded(
        self, session: Session, row: Feed, fetched: _Fetched, poll: FeedPoll, now: datetime
    ) -> NextCheck:
        result = fetched.fetch
        conditional = fetched.conditional
        row.polls_since_unconditional = row.polls_since_unconditional + 1 if conditional else 0
        if result.not_modified:
            poll.outcome = "not_modified"
            row.etag = result.headers.get("etag") or row.etag
            row.last_modified = result.headers.get("last-modified") or row.last_modified
        else:
            row.etag = result.headers.get("etag")
            row.last_modified = result.headers.get("last-modified")
        moved_note = None
        if result.permanent_url and result.permanent_url != row.url:
            moved_note = self._move(session, row, result.permanent_url, poll)
        parsed = fetched.parsed
        if parsed is not None:
            row.title = (parsed.title or row.title or "")[:512] or None
            row.site_url = parsed.site_url or row.site_url
            row.language = parsed.language or row.language
            poll.counts = store_entries(session, row, parsed.entries, now)
            poll.skipped = parsed.skipped
            row.body_hash = fetched.body_hash
            row.ttl_seconds = parsed.ttl_seconds
            row.last_warning = "; ".join(parsed.warnings)[:4000] or None
            gap = observed_entry_gap(
                (e.published_at for e in parsed.entries if e.published_source != FROM_FIRST_SEEN),
                now,
            )
            row.publish_interval = round(gap) if gap is not None else row.publish_interval
            if poll.counts.added:
                row.last_new_entry_at = now
            if parsed.warnings:
                log.info(
                    "feed parsed with warnings: %s", row.last_warning, extra={"feed_url": row.url}
                )
        elif fetched.same_body:
            poll.outcome = "unchanged"
        if moved_note:
            row.last_warning = "; ".join(filter(None, [row.last_warning, moved_note]))[:4000]
        if row.consecutive_failures:
            log.info(
                "feed recovered after %d failures", row.consecutive_failures,
                extra={"feed_url": row.url},
            )  # fmt: skip
        row.consecutive_failures = 0
        row.last_error = None
        row.last_error_kind = None
        row.last_success_at = now
        return after_success(
            now,
            self.options,
            interval=row.interval,
            fixed=row.interval_fixed,
            entry_gap=row.publish_interval,
            ttl_seconds=row.ttl_seconds,
            headers=result.headers,
        )

    def _move(self, session: Session, row: Feed, new_url: str, poll: FeedPoll) -> str | None:
        """Follow a permanent redirect: the feed's stored URL becomes the new one."""
        other = session.exec(select(Feed).where(Feed.url == new_url, Feed.id != row.id)).first()
        if other is not None:
            note = (
                f"{row.url} moved permanently to {new_url}, which is already feed #{other.id}: "
                "remove one of them"
            )
            log.warning(note, extra={"feed_url": row.url})
            return note
        log.info("feed moved permanently to %s", new_url, extra={"feed_url": row.url})
        poll.moved_to = new_url
        row.url = new_url
        return None


# --- Adding and checking feeds (the CLI's helpers) ----------------------------------------


class FeedExists(Exception):
    def __init__(self, feed: Feed) -> None:
        super().__init__(f"{feed.url} is already feed #{feed.id}")
        self.feed = feed


def normalize_feed_url(url: str) -> str:
    """A feed URL as typed by a person: scheme added when missing, validated."""
    url = url.strip()
    if "://" not in url:
        url = "https://" + url
    canon = canonical_url(url)
    if canon is None:
        raise ValueError(f"{url!r} is not an http(s) URL")
    # Keep tracking-looking parameters a feed URL may need; only tidy scheme/host/fragment.
    parts = urlsplit(url)
    canon_parts = urlsplit(canon)
    return canon_parts._replace(query=parts.query).geturl()


def add_feed(
    session: Session,
    url: str,
    options: FeedOptions,
    now: datetime,
    *,
    interval: int | None = None,
    title: str | None = None,
) -> Feed:
    """Add a feed, due at once. A given ``interval`` is fixed (never adapted)."""
    existing = session.exec(select(Feed).where(Feed.url == url)).first()
    if existing is not None:
        raise FeedExists(existing)
    feed = Feed(
        url=url,
        title=(title or None) and title[:512],
        interval=interval or options.default_interval,
        interval_fixed=interval is not None,
        next_check_at=now,
        next_check_reason="new feed: first check as soon as possible",
        created_at=now,
    )
    session.add(feed)
    session.flush()
    return feed


def find_feed(session: Session, url_or_id: str) -> Feed | None:
    text = url_or_id.strip()
    if text.lstrip("#").isdigit():
        return session.get(Feed, int(text.lstrip("#")))
    feed = session.exec(select(Feed).where(Feed.url == text)).first()
    if feed is None:
        try:
            feed = session.exec(select(Feed).where(Feed.url == normalize_feed_url(text))).first()
        except ValueError:
            return None
    return feed


@dataclass
class Probe:
    """What ``feeds add``/``feeds check`` learnt about a URL."""

    url: str
    fetch: FetchResult | None = None
    parsed: ParsedFeed | None = None
    problem: FeedProblem | None = None
    discovered_from: str | None = None

    @property
    def network_error(self) -> bool:
        kind = self.fetch.error_kind if self.fetch else None
        return kind is not None and (
            kind in ("dns", "connect", "timeout") or kind.startswith("http_5") or kind == "http_429"
        )


async def probe(fetcher: Fetcher, url: str, now: datetime, *, discover: bool = True) -> Probe:
    """Fetch and parse ``url``; on an HTML page, follow its first advertised feed."""
    fetched = await fetcher.fetch(url)
    result = Probe(fetched.permanent_url or url, fetched)
    if not fetched.ok or fetched.body is None:
        return result
    try:
        result.parsed = await asyncio.to_thread(
            parse_document, fetched.body, fetched.headers, fetched.final_url, now
        )
    except FeedProblem as problem:
        result.problem = problem
        if discover and problem.kind == NOT_A_FEED and problem.discovered:
            found = await probe(fetcher, problem.discovered[0], now, discover=False)
            found.discovered_from = url
            return found
    return result


def parse_file(data: bytes, name: str, now: datetime) -> ParsedFeed:
    """Parse a feed document read from a file (gzip by magic bytes), as ``feeds check`` does."""
    try:
        body, _ = sniff_decompress(data, 1 << 30)
    except Exception as exc:
        raise FeedProblem(PARSE, f"{name}: cannot be decompressed: {exc}") from exc
    return parse_document(body, {}, name, now)
