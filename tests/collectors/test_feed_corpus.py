"""Every real-world feed document of ../shared/feeds, served locally and polled for real.

For each file: the entries a tolerant parser recovers arrive once (their count checked against
SOURCES.md), with clean titles, links and text — or the feed carries a clear recorded error.
Never a crash. The second poll is conditional and stores nothing new.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from collectors.fetch import NOT_A_FEED
from collectors.normalize import is_tracking_param
from tests.collectors.conftest import Poller, corpus_names, read_sources, require_corpus
from tests.collectors.feedserver import FeedServer

# HTML elements (not any <Word>: code samples in text legitimately say "<MKOverlay>").
TAG = re.compile(
    r"</?(?:p|div|span|a|img|br|hr|b|i|em|strong|ul|ol|li|figure|figcaption|table|tr|td|"
    r"h[1-6]|blockquote|script|style|iframe|section|article|header|footer|source|video)"
    r"(?:\s[^>]*)?/?>",
    re.IGNORECASE,
)
ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")


def assert_clean_text(value: str, what: str) -> None:
    assert not TAG.search(value), f"{what} keeps markup: {value[:200]!r}"
    assert not ENTITY.search(value), f"{what} keeps an entity: {value[:200]!r}"
    assert "\x00" not in value and "\ufffd" not in value, f"{what} has broken characters"


def assert_clean_title(title: str) -> None:
    assert title, "empty title"
    assert title == title.strip() and "\n" not in title, f"title not on one line: {title!r}"
    assert_clean_text(title, "title")


def assert_clean_link(link: str) -> None:
    assert re.match(r"https?://[^\s/]+/", link), f"link not absolute http(s): {link!r}"
    assert "#" not in link and not any(c.isspace() for c in link), link
    query = link.split("?", 1)[1] if "?" in link else ""
    assert not any(is_tracking_param(p.split("=")[0]) for p in query.split("&") if p), link


def test_every_corpus_file_is_listed_in_sources() -> None:
    corpus = require_corpus()
    files = {p.name for p in corpus.iterdir() if p.is_file() and p.name != "SOURCES.md"}
    assert files == set(read_sources(corpus / "SOURCES.md"))


@pytest.mark.parametrize("name", corpus_names())
async def test_corpus_document_polled(name: str, feed_server: FeedServer, poller: Poller) -> None:
    corpus = require_corpus()
    expected = read_sources(corpus / "SOURCES.md")[name]
    feed_server.serve_corpus(corpus)
    path = f"/corpus/{name}"
    feed_id = poller.add(feed_server.url(path))

    result = await poller.poll()

    assert len(result.polls) == 1
    poll = result.polls[0]
    feed = poller.feed(feed_id)
    stored = poller.articles(feed_id)
    if expected.not_a_feed:
        assert poll.outcome == NOT_A_FEED
        assert feed.last_error_kind == NOT_A_FEED and feed.consecutive_failures == 1
        assert feed.last_error and feed.url in feed.last_error and "not a feed" in feed.last_error
        assert stored == []
        assert feed.enabled and feed.next_check_at is not None
        return

    assert poll.outcome == "ok", f"{name}: {poll.outcome}: {poll.error}"
    assert feed.last_error is None and feed.consecutive_failures == 0
    # Every entry a tolerant parser recovers arrives once; an empty one is counted as skipped.
    assert len(stored) + poll.skipped == expected.items, (name, len(stored), poll.skipped)
    assert len({a.uid for a in stored}) == len(stored)
    if poll.skipped:
        assert feed.last_warning and "skipped" in feed.last_warning
    if not expected.strict_ok:  # ill-formed as stored: what was recovered is flagged
        assert feed.last_warning, f"{name}: a recovered ill-formed feed must record a warning"
    for article in stored:
        assert_clean_title(article.title)
        assert_clean_text(article.text, f"{name} text")
        if article.url is not None:
            assert_clean_link(article.url)
        assert article.published_at is not None and article.published_source
        assert article.content_hash and article.status == "new" and article.source == "feed"
    linked = [a for a in stored if a.url]
    if name != "rbren__rss-parser__missing-fields.atom":  # its one entry has only an id
        assert len(linked) == len(stored), f"{name}: entries without links"

    # Second poll: conditional, answered 304, nothing stored.
    again = await poller.poll_when_due(feed_id)
    request = feed_server.hits(path)[-1]
    assert request.headers.get("if-none-match") == feed.etag
    assert request.headers.get("if-modified-since") == feed.last_modified
    assert [p.outcome for p in again.polls] == ["not_modified"]
    assert len(poller.articles(feed_id)) == len(stored)


async def test_corpus_details_survive(feed_server: FeedServer, poller: Poller) -> None:
    """The hard parts of specific documents come out right."""
    corpus = require_corpus()
    feed_server.serve_corpus(corpus)
    ids = {
        name: poller.add(feed_server.url(f"/corpus/{name}"))
        for name in (
            "feed-rs__feed-rs__rss_2.0_ilgiornale.xml",
            "miniflux__v2__windows-1252.xml",
            "rbren__rss-parser__uolNoticias.rss",
            "danmactough__node-feedparser__tpm.atom",
            "danmactough__node-feedparser__iconv.xml",
            "danmactough__node-feedparser__invalid-characters-gzipped.xml",
            "Ranchero-Software__NetNewsWire__donthitsave.xml",
            "miniflux__v2__urdu_UTF8.xml",
            "feed-rs__feed-rs__rss_0.91_spec_1.xml",
            "rbren__rss-parser__guardian.rss",
        )
    }
    result = await poller.poll()
    assert {p.outcome for p in result.polls} == {"ok"}, [(p.url, p.error) for p in result.polls]

    def only(name: str) -> list:
        return poller.articles(ids[name])

    # Italian news: double-escaped apostrophes end up as apostrophes; language from the feed.
    (giornale,) = only("feed-rs__feed-rs__rss_2.0_ilgiornale.xml")
    assert "l'uomo" in giornale.text and "d'onore" in giornale.text
    assert giornale.language == "it" and giornale.published_source == "entry"
    assert giornale.title.startswith("Arrestato in Pakistan Shabbar Abbas")
    # windows-1252: byte 0x80 is the euro sign.
    assert poller.feed(ids["miniflux__v2__windows-1252.xml"]).title == "Euro €"
    # Latin-1 without a declaration, Portuguese dates: read, in UTC.
    uol = only("rbren__rss-parser__uolNoticias.rss")
    assert any("simulações" in a.title for a in uol)
    ibope = next(a for a in uol if a.title.startswith("Ibope: Bolsonaro perde"))
    assert ibope.published_at == datetime(2018, 9, 24, 22, 42, 40, tzinfo=UTC)
    assert ibope.published_source == "entry" and ibope.language == "pt"
    # Relative links resolved against the site.
    for article in only("danmactough__node-feedparser__tpm.atom"):
        assert article.url and article.url.startswith("http://talkingpointsmemo.com/")
    # windows-1251 Cyrillic.
    assert any("Оренбург" in a.title for a in only("danmactough__node-feedparser__iconv.xml"))
    # Gzip body with no Content-Encoding, sniffed and inflated.
    nshipster = only("danmactough__node-feedparser__invalid-characters-gzipped.xml")
    assert any(a.title == "NSOperation" for a in nshipster)
    # UTF-8 with a BOM.
    assert len(only("Ranchero-Software__NetNewsWire__donthitsave.xml")) == 10
    # Right-to-left script, language declared.
    assert {a.language for a in only("miniflux__v2__urdu_UTF8.xml")} == {"ur"}
    # No dates at all: first-seen, marked as such.
    for article in only("feed-rs__feed-rs__rss_0.91_spec_1.xml"):
        assert article.published_source == "first_seen" and article.published_at == poller.clock()
    # HTML descriptions become paragraphs of text.
    guardian = only("rbren__rss-parser__guardian.rss")
    assert all(a.language == "en" for a in guardian)
    assert any("\n\n" in a.text for a in guardian)
