"""Fixtures for the feed collector: the local HTTP server, a settable clock, the corpus."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from collectors.feeds import FeedCollector, FeedOptions, PollResult, add_feed
from collectors.fetch import make_http_client
from storage.db import SessionFactory, transaction
from storage.models import Article, Feed
from tests.collectors.feedserver import FeedServer
from tests.conftest import REPO

CORPUS_ENV = "COALITION_WATCH_FEED_CORPUS"
DATA = REPO / "tests" / "data" / "feeds"
START = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def corpus_path() -> Path:
    return Path(os.environ.get(CORPUS_ENV) or REPO.parent / "shared" / "feeds")


def corpus_missing_message() -> str | None:
    path = corpus_path()
    if (path / "SOURCES.md").is_file():
        return None
    return (
        f"the real-feed corpus is not at {path} (expected ../shared/feeds beside the clone, "
        f"or set {CORPUS_ENV}): corpus tests cannot run"
    )


def require_corpus() -> Path:
    """The corpus folder; a skip with the reason when absent, a failure under CI=true."""
    message = corpus_missing_message()
    if message is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return corpus_path()


@dataclass(frozen=True)
class CorpusRow:
    name: str
    items: int  # what the fixture's own library expects
    strict_ok: bool  # False where a strict XML parser rejects the file
    not_a_feed: bool


def read_sources(path: Path) -> dict[str, CorpusRow]:
    """The table of SOURCES.md: file name → expected entry count and strictness."""
    rows: dict[str, CorpusRow] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or cells[0] in ("file", "") or set(cells[0]) <= {"-"}:
            continue
        m = re.match(r"(\d+)", cells[3])
        if not m:
            continue
        rows[cells[0]] = CorpusRow(
            name=cells[0],
            items=int(m.group(1)),
            strict_ok="fails" not in cells[4],
            not_a_feed="not a feed" in cells[2].lower(),
        )
    return rows


def corpus_names() -> list[str]:
    """Parametrization at collection time: the corpus' files, or one placeholder."""
    if corpus_missing_message() is not None:
        return ["<corpus missing>"]
    return sorted(read_sources(corpus_path() / "SOURCES.md"))


class Clock:
    """A settable clock for schedules; fetch timeouts still use real time."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def to(self, moment: datetime) -> datetime:
        self.now = max(self.now, moment)
        return self.now


def feed_options(**overrides: object) -> FeedOptions:
    values: dict[str, object] = {"connect_timeout": 3.0, "total_timeout": 10.0}
    values.update(overrides)
    return FeedOptions.model_validate(values)


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    server = FeedServer().start()
    yield server
    server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Poller:
    """Adds feeds and runs polling passes the way the service job does."""

    def __init__(self, sessions: SessionFactory, clock: Clock) -> None:
        self.sessions = sessions
        self.clock = clock
        self.options = feed_options()
        self.rng = random.Random(7)

    def add(self, url: str, **kwargs: object) -> int:
        with transaction(self.sessions) as session:
            feed = add_feed(session, url, self.options, self.clock(), **kwargs)  # type: ignore[arg-type]
            assert feed.id is not None
            return feed.id

    async def poll(self) -> PollResult:
        async with make_http_client(self.options) as client:
            collector = FeedCollector(
                self.options,
                client=client,
                sessions=self.sessions,
                clock=self.clock,
                owner="test-owner",
                rng=self.rng,
            )
            return await collector.poll_due()

    async def poll_when_due(self, feed_id: int) -> PollResult:
        """Move the clock to the feed's next check, then poll."""
        feed = self.feed(feed_id)
        assert feed.next_check_at is not None
        self.clock.to(feed.next_check_at)
        return await self.poll()

    def feed(self, feed_id: int) -> Feed:
        with self.sessions() as session:
            feed = session.get(Feed, feed_id)
            assert feed is not None
            return feed

    def articles(self, feed_id: int | None = None) -> list[Article]:
        with self.sessions() as session:
            query = select(Article).order_by(Article.id)  # type: ignore[arg-type]
            if feed_id is not None:
                query = query.where(Article.feed_id == feed_id)
            return list(session.exec(query))


@pytest.fixture
def poller(sessions: SessionFactory, clock: Clock) -> Poller:
    return Poller(sessions, clock)
