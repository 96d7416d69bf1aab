"""Fetching against a real local server: redirects, errors, limits, timeouts, compression."""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import zlib
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest

from collectors.feeds import FeedOptions
from collectors.fetch import (
    CONNECT,
    DNS,
    REDIRECT,
    TIMEOUT,
    TOO_LARGE,
    Fetcher,
    FetchResult,
    describe_transport_error,
    make_http_client,
    parse_retry_after,
)
from tests.collectors.conftest import DATA, Poller, feed_options
from tests.collectors.feedserver import FeedServer, Handler, Reply, Request, conditional
from tests.conftest import free_port

IT_FEED = (DATA / "coalition_it.xml").read_bytes()
EN_FEED = (DATA / "coalition_en.atom").read_bytes()


def redirect(status: int, location: str) -> Handler:
    return lambda _request: Reply(status, {"Location": location})


async def fetch(options: FeedOptions, url: str, etag: str | None = None) -> FetchResult:
    async with make_http_client(options) as client:
        return await Fetcher(client, options).fetch(url, etag=etag)


async def test_permanent_redirect_moves_the_stored_url(feed_server: FeedServer, poller: Poller):
    old = feed_server.route("/old.xml", redirect(301, "/new.xml"))
    new = feed_server.document("/new.xml", IT_FEED)
    feed_id = poller.add(old)

    result = await poller.poll()

    (poll,) = result.polls
    assert poll.outcome == "ok" and poll.moved_to == new
    assert poller.feed(feed_id).url == new
    assert len(poller.articles(feed_id)) == 3
    # The next poll goes straight to the new address.
    await poller.poll_when_due(feed_id)
    assert len(feed_server.hits("/old.xml")) == 1 and len(feed_server.hits("/new.xml")) == 2


async def test_redirect_chain_keeps_url_unless_it_starts_permanent(
    feed_server: FeedServer, poller: Poller
):
    # 302 → 307 → 308 → feed: temporary first, so the stored URL stays.
    start = feed_server.route("/hop1", redirect(302, "/hop2"))
    feed_server.route("/hop2", redirect(307, feed_server.url("/hop3")))
    feed_server.route("/hop3", redirect(308, "/chain.xml"))
    feed_server.document("/chain.xml", IT_FEED)
    # 301 → 302 → feed: the permanent part of the chain is followed, the rest is not.
    other = feed_server.route("/p1", redirect(301, "/p2"))
    feed_server.route("/p2", redirect(302, "/chain2.xml"))
    feed_server.document("/chain2.xml", EN_FEED)
    first = poller.add(start)
    second = poller.add(other)

    result = await poller.poll()

    assert {p.outcome for p in result.polls} == {"ok"}
    assert poller.feed(first).url == start
    assert poller.feed(second).url == feed_server.url("/p2")
    assert len(poller.articles(first)) == 3 and len(poller.articles(second)) == 2


async def test_redirect_loops_and_long_chains_are_errors(feed_server: FeedServer, poller: Poller):
    loop = feed_server.route("/loop-a", redirect(302, "/loop-b"))
    feed_server.route("/loop-b", redirect(302, "/loop-a"))
    for i in range(8):
        feed_server.route(f"/many/{i}", redirect(302, f"/many/{i + 1}"))
    feed_server.document("/many/8", IT_FEED)
    loop_id = poller.add(loop)
    many_id = poller.add(feed_server.url("/many/0"))

    await poller.poll()

    looped, many = poller.feed(loop_id), poller.feed(many_id)
    assert looped.last_error_kind == REDIRECT and "loop" in (looped.last_error or "")
    assert many.last_error_kind == REDIRECT and "more than 5" in (many.last_error or "")
    assert loop in (looped.last_error or "")
    assert feed_server.url("/many/0") in (many.last_error or "")
    assert len(feed_server.hits("/many/5")) == 1 and feed_server.hits("/many/6") == []


@pytest.mark.parametrize("status", [404, 410, 500, 502])
async def test_http_errors_are_recorded_with_the_url(
    status: int, feed_server: FeedServer, poller: Poller
):
    url = feed_server.route("/broken.xml", lambda _r: Reply(status, {}, b"oops"))
    feed_id = poller.add(url)

    (poll,) = (await poller.poll()).polls

    feed = poller.feed(feed_id)
    assert poll.outcome == f"http_{status}" == feed.last_error_kind
    assert url in (feed.last_error or "") and str(status) in (feed.last_error or "")
    assert feed.consecutive_failures == 1 and feed.enabled
    assert feed.next_check_at is not None and feed.next_check_at > poller.clock()


async def test_429_retry_after_is_respected(feed_server: FeedServer, poller: Poller):
    url = feed_server.route("/busy.xml", lambda _r: Reply(429, {"Retry-After": "7200"}))
    feed_id = poller.add(url)

    await poller.poll()

    feed = poller.feed(feed_id)
    assert feed.last_error_kind == "http_429" and "Retry-After: 7200 s" in (feed.last_error or "")
    assert feed.next_check_at is not None
    assert feed.next_check_at - poller.clock() >= timedelta(seconds=7200)
    assert "Retry-After" in (feed.next_check_reason or "")


async def test_503_retry_after_as_http_date(feed_server: FeedServer, poller: Poller):
    from email.utils import format_datetime

    later = format_datetime(poller.clock() + timedelta(hours=3), usegmt=True)
    url = feed_server.route("/maint.xml", lambda _r: Reply(503, {"Retry-After": later}))
    assert parse_retry_after(later, poller.clock()) == pytest.approx(3 * 3600, abs=1)
    feed_id = poller.add(url)

    await poller.poll()

    feed = poller.feed(feed_id)
    assert feed.last_error_kind == "http_503"
    # The server's date is read against the wall clock; it still holds off the next check.
    assert feed.next_check_at is not None and feed.next_check_at > poller.clock()


async def test_slow_response_times_out(feed_server: FeedServer, poller: Poller):
    poller.options = feed_options(total_timeout=0.5)
    url = feed_server.route("/slow.xml", lambda _r: Reply(200, {}, IT_FEED, delay=3))
    feed_id = poller.add(url)

    started = time.monotonic()
    (poll,) = (await poller.poll()).polls

    assert time.monotonic() - started < 2.5
    feed = poller.feed(feed_id)
    assert poll.outcome == TIMEOUT == feed.last_error_kind
    assert url in (feed.last_error or "") and "0.5 s" in (feed.last_error or "")


def endless() -> Iterator[bytes]:
    chunk = b"<item><title>again</title></item>" * 2000
    yield b'<?xml version="1.0"?><rss version="2.0"><channel><title>x</title>'
    while True:
        yield chunk


async def test_endless_body_stops_at_the_cap(feed_server: FeedServer, poller: Poller):
    poller.options = feed_options(max_body_bytes=1_000_000)
    headers = {"Content-Type": "application/rss+xml"}
    url = feed_server.route("/endless.xml", lambda _r: Reply(200, headers, stream=endless))
    feed_id = poller.add(url)

    started = time.monotonic()
    (poll,) = (await poller.poll()).polls

    assert time.monotonic() - started < 5
    feed = poller.feed(feed_id)
    assert poll.outcome == TOO_LARGE == feed.last_error_kind
    assert url in (feed.last_error or "") and "1,000,000" in (feed.last_error or "")
    assert poller.articles(feed_id) == []


async def test_gzip_without_header_and_with_header(feed_server: FeedServer, poller: Poller):
    bare = feed_server.route(
        "/bare.xml",
        lambda _r: Reply(200, {"Content-Type": "application/rss+xml"}, gzip.compress(IT_FEED)),
    )
    encoded = feed_server.route(
        "/encoded.xml",
        lambda _r: Reply(
            200,
            {"Content-Type": "application/atom+xml", "Content-Encoding": "gzip"},
            gzip.compress(EN_FEED),
        ),
    )
    deflated = feed_server.route(
        "/zlib.xml", lambda _r: Reply(200, {"Content-Type": "text/xml"}, zlib.compress(EN_FEED))
    )
    ids = [poller.add(bare), poller.add(encoded), poller.add(deflated)]

    result = await poller.poll()

    assert [p.outcome for p in result.polls] == ["ok", "ok", "ok"]
    counts = [len(poller.articles(i)) for i in ids]
    # The zlib body is the Atom feed again: whichever is stored second adds only duplicates.
    assert counts[0] == 3 and counts[1] + counts[2] == 2 and result.duplicates == 2
    sniffed = await fetch(poller.options, bare)
    assert sniffed.decompressed == "gzip" and sniffed.body == IT_FEED


async def test_gzip_bomb_is_too_large(feed_server: FeedServer, poller: Poller):
    poller.options = feed_options(max_body_bytes=200_000)
    bomb = gzip.compress(b"<rss>" + b" " * 5_000_000)
    url = feed_server.route("/bomb.xml", lambda _r: Reply(200, {}, bomb))
    feed_id = poller.add(url)

    await poller.poll()

    assert poller.feed(feed_id).last_error_kind == TOO_LARGE


async def test_html_page_is_not_a_feed_and_names_its_feeds(feed_server: FeedServer, poller: Poller):
    page = (DATA / "page_with_feed.html").read_bytes()
    url = feed_server.route("/esteri/", lambda _r: Reply(200, {"Content-Type": "text/html"}, page))
    feed_id = poller.add(url)

    await poller.poll()

    feed = poller.feed(feed_id)
    assert feed.last_error_kind == "not_a_feed"
    assert url in (feed.last_error or "") and "HTML page" in (feed.last_error or "")
    assert feed_server.url("/feeds/esteri.xml") in (feed.last_error or "")


async def test_connection_refused_is_a_connect_error(poller: Poller):
    url = f"http://127.0.0.1:{free_port()}/feed.xml"
    feed_id = poller.add(url)

    (poll,) = (await poller.poll()).polls

    feed = poller.feed(feed_id)
    assert poll.outcome == CONNECT == feed.last_error_kind
    assert "127.0.0.1" in (feed.last_error or "") and url in (feed.last_error or "")


def test_dns_failures_are_told_apart() -> None:
    options = feed_options()
    cause = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    error = httpx.ConnectError("[Errno -2] Name or service not known")
    error.__cause__ = cause
    kind, message = describe_transport_error(error, "https://no-such-host.invalid/rss", options)
    assert kind == DNS and "no-such-host.invalid" in message
    kind, _ = describe_transport_error(
        httpx.ConnectError("[Errno 111] Connection refused"), "https://a.example/rss", options
    )
    assert kind == CONNECT
    kind, message = describe_transport_error(
        httpx.ConnectTimeout("timed out"), "https://a.example/rss", options
    )
    assert kind == TIMEOUT and "connecting to a.example" in message


async def test_requests_carry_user_agent_and_accept(feed_server: FeedServer, poller: Poller):
    poller.add(feed_server.document("/ua.xml", IT_FEED))
    await poller.poll()
    (request,) = feed_server.hits("/ua.xml")
    assert request.headers["user-agent"].startswith("coalition-watch/")
    assert "application/rss+xml" in request.headers["accept"]
    assert "gzip" in request.headers["accept-encoding"]


def _slow(request: Request) -> Reply:
    return Reply(200, {"Content-Type": "application/rss+xml"}, IT_FEED, delay=0.3)


@pytest.mark.parametrize(("global_limit", "per_host", "expected"), [(20, 2, 2), (3, 10, 3)])
async def test_concurrency_limits(
    global_limit: int, per_host: int, expected: int, feed_server: FeedServer
) -> None:
    options = feed_options(max_concurrency=global_limit, per_host_concurrency=per_host)
    urls = [feed_server.route(f"/c/{i}.xml", _slow) for i in range(8)]
    async with make_http_client(options) as client:
        fetcher = Fetcher(client, options)
        results = await asyncio.gather(*(fetcher.fetch(u) for u in urls))
    assert all(r.ok for r in results)
    assert feed_server.max_active == expected


async def test_conditional_fetch_gets_304(feed_server: FeedServer) -> None:
    url = feed_server.route("/c.xml", conditional(IT_FEED, "application/rss+xml", etag='"v1"'))
    options = feed_options()
    first = await fetch(options, url)
    again = await fetch(options, url, etag='"v1"')
    assert first.status == 200 and again.not_modified and again.body is None
    assert feed_server.hits("/c.xml")[-1].headers["if-none-match"] == '"v1"'
