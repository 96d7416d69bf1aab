"""Hostile feeds: every one gets a clear recorded error or a tolerant parse, never a crash,
with bounded memory and time, and the feeds polled beside them are unaffected.

The documents are served by a real HTTP server on 127.0.0.1 (the reliability feed farm) plus a
raw socket server for what ``http.server`` cannot do (a status line trickled byte by byte, a
connection that never answers), and polled by the real stage (``FeedCollector.poll_due``,
what the service's collect job runs). hypothesis generates malformed documents: each one is
parsed on its own, then all of them are served and polled in one cycle with good feeds.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import select

from collectors.feeds import FeedCollector, FeedOptions, PollResult, add_feed
from collectors.fetch import Fetcher, FetchResult, make_http_client
from collectors.normalize import detect_language
from collectors.parse import MAX_ENTITY_EXPANSION, FeedProblem, ParsedFeed, parse_document
from storage.db import SessionFactory, transaction
from storage.models import Article, Feed
from tests.collectors.feedserver import Reply
from tests.reliability.conftest import FeedFarm

TOTAL_TIMEOUT = 3.0  # seconds for a whole fetch in these tests (the default is 30)
GOOD_FEEDS, GOOD_ENTRIES = 3, 10
MB = 1024 * 1024
HUGE = 50 * MB  # the hostile bodies
CAP = 2_000_000  # the body cap in the hostile cycle (default 10 MB): peaks stay far below HUGE
RSS_TYPE = {"Content-Type": "application/rss+xml"}


def options(**overrides: object) -> FeedOptions:
    values: dict[str, object] = {"connect_timeout": 2.0, "total_timeout": TOTAL_TIMEOUT}
    values.update(overrides)
    return FeedOptions.model_validate(values)


async def poll_once(sessions: SessionFactory, opts: FeedOptions) -> PollResult:
    """One polling cycle of the real stage, as the collect job runs it."""
    async with make_http_client(opts) as client:
        collector = FeedCollector(
            opts, client=client, sessions=sessions, clock=lambda: datetime.now(UTC),
            owner="fault-test", rng=random.Random(3),
        )  # fmt: skip
        return await collector.poll_due()


def add_feeds(sessions: SessionFactory, urls: list[str], opts: FeedOptions) -> dict[str, int]:
    now = datetime.now(UTC)
    ids: dict[str, int] = {}
    with transaction(sessions) as session:
        for url in urls:
            feed = add_feed(session, url, opts, now)
            assert feed.id is not None
            ids[url] = feed.id
    return ids


def feeds_by_url(sessions: SessionFactory) -> dict[str, Feed]:
    with sessions() as session:
        return {f.url: f for f in session.exec(select(Feed))}


def article_counts(sessions: SessionFactory) -> dict[int, int]:
    with sessions() as session:
        counts: dict[int, int] = {}
        for article in session.exec(select(Article)):
            assert article.feed_id is not None
            counts[article.feed_id] = counts.get(article.feed_id, 0) + 1
        return counts


# --- memory ---------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@dataclass
class Peak:
    rss_growth: int = 0  # bytes: peak resident set size during the block, minus before
    traced_peak: int = 0  # bytes: peak of Python allocations during the block, minus before


@contextmanager
def measure_peak() -> Iterator[Peak]:
    """Peak RSS growth (``VmHWM`` reset through ``/proc/self/clear_refs``, and a 5 ms sampler
    of ``VmRSS`` in case the reset is not allowed) and tracemalloc's peak, over the block."""
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc/self/status (Linux only)")
    peak = Peak()
    before = _status_kb("VmRSS")
    hwm_reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        hwm_reset = False
    sampled = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            sampled.append(_status_kb("VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    traced_before = tracemalloc.get_traced_memory()[0]
    try:
        yield peak
    finally:
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        done.set()
        sampler.join(timeout=5)
        top = max(sampled)
        if hwm_reset:
            top = max(top, _status_kb("VmHWM"))
        peak.rss_growth = (top - before) * 1024
        peak.traced_peak = traced - traced_before


# --- hostile documents ----------------------------------------------------------------------


def rss(items: int, title: str = "Coalition wire", prefix: str = "x") -> bytes:
    body = "".join(
        f"<item><title>Coalition item {i} of {escape(title)}</title>"
        f"<link>https://hostile.example/{prefix}/{i}</link><guid>{prefix}-{i}</guid>"
        f"<pubDate>Tue, 06 Jan 2026 10:{i % 60:02d}:00 GMT</pubDate>"
        f"<description>Leaders of the coalition discussed the reassurance force, item {i}, "
        f"in a document called {escape(title)}.</description></item>"
        for i in range(items)
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
        f"<title>{escape(title)}</title><link>https://hostile.example/</link>{body}"
        "</channel></rss>"
    ).encode()


def billion_laughs(levels: int = 10) -> bytes:
    lines = ['<?xml version="1.0"?>', "<!DOCTYPE rss [", ' <!ENTITY lol0 "lol">']
    lines += [f' <!ENTITY lol{i} "' + f"&lol{i - 1};" * 10 + '">' for i in range(1, levels)]
    top = f"&lol{levels - 1};"
    lines += [
        "]>",
        f'<rss version="2.0"><channel><title>Laughs {top}</title><item><title>{top}</title>'
        f"<guid>laugh</guid><description>{top}</description></item></channel></rss>",
    ]
    return "\n".join(lines).encode()


def quadratic_blowup(size: int = 100_000, refs: int = 10_000, oneline: bool = False) -> bytes:
    """One large flat entity referenced many times (no nesting: it passes naive filters)."""
    nl = "" if oneline else "\n"
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE rss [{nl}<!ENTITY big "{"A" * size}">{nl}]>\n'
        '<rss version="2.0"><channel><title>Blowup</title><item><title>big</title>'
        f"<guid>big</guid><description>{'&big;' * refs}</description></item></channel></rss>"
    ).encode()


def streamed(total: int, chunk: bytes) -> Callable[[], Iterator[bytes]]:
    def gen() -> Iterator[bytes]:
        yield b'<?xml version="1.0"?><rss version="2.0"><channel><title>Huge</title>'
        sent = 0
        while sent < total:
            yield chunk
            sent += len(chunk)

    return gen


def trickle(data: bytes, every: float = 1.0) -> Callable[[], Iterator[bytes]]:
    def gen() -> Iterator[bytes]:
        for byte in data:
            yield bytes([byte])
            time.sleep(every)

    return gen


class RawServer:
    """A TCP server on 127.0.0.1 for what an HTTP server library will not do.

    ``trickle``: reads the request, then sends a status line and headers one byte a second.
    ``silent``: accepts the connection and the request, and never answers.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/feed.xml"
        self.connections = 0
        self.closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                if self.mode == "silent":
                    self.closing.wait(30)
                    return
                for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/rss+xml\r\n\r\n":
                    if self.closing.wait(1.0):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up: what we want

    def close(self) -> None:
        self.closing.set()
        self.sock.close()


@pytest.fixture
def raw_servers() -> Iterator[dict[str, RawServer]]:
    servers = {"trickle-headers": RawServer("trickle"), "silent": RawServer("silent")}
    yield servers
    for server in servers.values():
        server.close()


@dataclass
class Expect:
    """What a hostile feed must end as: an error of one of ``kinds`` whose message names the
    URL (and contains ``says``), or — with ``tolerant`` — a parse that stores entries."""

    kinds: tuple[str, ...] = ()
    says: str = ""
    tolerant: bool = False
    entries: int | None = None
    max_seconds: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


def serve_hostile(farm: FeedFarm, raw: dict[str, RawServer]) -> dict[str, Expect]:
    rng = random.Random(20260106)
    full = rss(20, prefix="trunc")
    huge_gzip = gzip.compress(
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>Bomb</title>'
        + b" " * HUGE + b"</channel></rss>", compresslevel=6,
    )  # fmt: skip
    xxe = (
        '<?xml version="1.0"?>\n<!DOCTYPE rss [\n'
        '<!ENTITY file SYSTEM "file:///etc/hostname">\n'
        f'<!ENTITY remote SYSTEM "{farm.url("/xxe-probe")}">\n]>\n'
        '<rss version="2.0"><channel><title>XXE</title><item><title>Leak &file;</title>'
        "<guid>xxe</guid><description>Remote &remote; and file &file;.</description>"
        "</item></channel></rss>"
    ).encode()
    rss_type = RSS_TYPE
    served: dict[str, tuple[Reply, Expect]] = {
        "/hostile/random.xml": (
            Reply(200, rss_type, rng.randbytes(256 * 1024)),
            Expect(("parse", "not_a_feed"), tolerant=True),
        ),
        "/hostile/empty.xml": (Reply(200, rss_type, b""), Expect(("not_a_feed",), "empty")),
        "/hostile/truncated.xml": (
            Reply(200, rss_type, full[: int(len(full) * 0.6)]),
            Expect(("parse",), tolerant=True),
        ),
        "/hostile/truncated-early.xml": (
            Reply(200, rss_type, full[:37]),
            Expect(("parse", "not_a_feed")),
        ),
        "/hostile/laughs.xml": (
            Reply(200, rss_type, billion_laughs()),
            Expect(("parse",), "entity-expansion"),
        ),
        "/hostile/blowup.xml": (
            Reply(200, rss_type, quadratic_blowup()),
            Expect(("parse",), "entity-expansion"),
        ),
        "/hostile/blowup-oneline.xml": (
            Reply(200, rss_type, quadratic_blowup(oneline=True)),
            Expect(("parse",), "entity-expansion"),
        ),
        "/hostile/blowup-utf16.xml": (
            Reply(200, rss_type, quadratic_blowup().decode().encode("utf-16")),
            Expect(("parse",), "entity-expansion"),
        ),
        "/hostile/xxe.xml": (Reply(200, rss_type, xxe), Expect(tolerant=True, entries=1)),
        "/hostile/huge-declared.xml": (
            Reply(200, {**rss_type, "Content-Length": str(HUGE)}, stream=streamed(HUGE, b" " * MB)),
            Expect(("too_large",), "over the cap"),
        ),
        "/hostile/huge-streamed.xml": (
            Reply(200, rss_type, stream=streamed(HUGE, b"<p>" + b"a" * 65533)),
            Expect(("too_large",), "body cap"),
        ),
        "/hostile/gzip-bomb.xml": (
            Reply(200, {**rss_type, "Content-Encoding": "gzip"}, huge_gzip),
            Expect(("too_large",), "body cap"),
        ),
        "/hostile/gzip-bomb-unlabelled.xml": (
            Reply(200, rss_type, huge_gzip),
            Expect(("too_large",), "body cap"),
        ),
        "/hostile/trickle-body.xml": (
            Reply(200, rss_type, stream=trickle(full)),
            Expect(("timeout",), "within", max_seconds=TOTAL_TIMEOUT + 2),
        ),
        "/hostile/slow-start.xml": (
            Reply(200, rss_type, full, delay=TOTAL_TIMEOUT + 3),
            Expect(("timeout",), max_seconds=TOTAL_TIMEOUT + 2),
        ),
        "/hostile/html.xml": (
            Reply(200, {"Content-Type": "text/html"}, b"<!doctype html><title>Hi</title><p>x"),
            Expect(("not_a_feed",), "HTML page"),
        ),
        "/hostile/lying-json.xml": (
            Reply(200, rss_type, b'{"version": "https://jsonfeed.org/version/1.1", "items": 7'),
            Expect(("not_a_feed",), "JSON"),
        ),
    }
    expectations: dict[str, Expect] = {}
    for path, (reply, expect) in served.items():
        expectations[farm.reply(path, reply)] = expect
    expectations[raw["trickle-headers"].url] = Expect(
        ("timeout",), "within", max_seconds=TOTAL_TIMEOUT + 2
    )
    expectations[raw["silent"].url] = Expect(("timeout",), max_seconds=TOTAL_TIMEOUT + 2)
    return expectations


def test_hostile_feeds_get_a_clear_error_each_in_bounded_memory_and_time(
    sessions: SessionFactory, feed_farm: FeedFarm, raw_servers: dict[str, RawServer]
) -> None:
    # All servers share the host 127.0.0.1: lift the per-host limit so that each fetch's time
    # is its own server's doing, not time queued behind the other slow servers.
    opts = options(max_concurrency=40, per_host_concurrency=40, max_body_bytes=CAP)
    good = feed_farm.generate(GOOD_FEEDS + 1, GOOD_ENTRIES)
    # Warm-up (not measured): the first poll loads the parsers, and the language identifier
    # (py3langid, about 110 MB once per process) is loaded as the first undeclared language
    # would load it.
    add_feeds(sessions, good[-1:], opts)
    warm = asyncio.run(poll_once(sessions, opts))
    assert warm.outcomes["ok"] == 1
    assert detect_language("The coalition of the willing met in Paris to discuss guarantees.")

    expectations = serve_hostile(feed_farm, raw_servers)
    ids = add_feeds(sessions, [*good[:GOOD_FEEDS], *expectations], opts)
    started = time.monotonic()
    with measure_peak() as peak:
        result = asyncio.run(poll_once(sessions, opts))
    elapsed = time.monotonic() - started

    # Every feed was polled once in this cycle; none crashed the poll.
    polls = {p.feed_id: p for p in result.polls}
    assert sorted(polls) == sorted(ids.values())
    assert not [p for p in result.polls if p.outcome == "internal_error"], result.summary()

    feeds = feeds_by_url(sessions)
    stored = article_counts(sessions)
    report = []
    for url, expect in expectations.items():
        feed, poll = feeds[url], polls[ids[url]]
        report.append(
            f"{url.split('/', 3)[-1]:<32} {poll.outcome:<11} {poll.fetch_seconds:5.2f}s "
            f"{stored.get(ids[url], 0):>3} stored  "
            f"{(feed.last_error or feed.last_warning or '')[:90]}"
        )
        if feed.last_error_kind is None:
            assert expect.tolerant, f"{url} was accepted: {poll}"
            assert stored.get(ids[url], 0) >= (expect.entries or 1), f"{url}: nothing stored"
        else:
            assert feed.last_error_kind in expect.kinds, (
                url,
                feed.last_error_kind,
                feed.last_error,
            )
            assert feed.last_error and url in feed.last_error, (url, feed.last_error)
            assert expect.says in feed.last_error, (url, feed.last_error)
            assert feed.consecutive_failures == 1 and feed.next_check_at is not None
            assert stored.get(ids[url], 0) == 0
        if expect.max_seconds is not None:
            assert poll.fetch_seconds < expect.max_seconds, (url, poll.fetch_seconds)
    print("\n" + "\n".join(report))

    # The truncated document keeps the entries before the cut, with a warning.
    truncated = feeds[feed_farm.url("/hostile/truncated.xml")]
    assert truncated.last_error is None and truncated.last_warning
    assert "ill-formed" in truncated.last_warning
    assert 5 <= stored[ids[truncated.url]] < 20
    # External entities are never resolved: no file read, no request made.
    with sessions() as session:
        xxe_id = ids[feed_farm.url("/hostile/xxe.xml")]
        xxe = session.exec(select(Article).where(Article.feed_id == xxe_id)).one()
    hostname = Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").exists() else ""
    assert not hostname or hostname not in f"{xxe.title} {xxe.text}"
    assert feed_farm.server.hits("/xxe-probe") == []
    assert raw_servers["silent"].connections == 1  # one try per cycle, no retry storm

    # The good feeds polled in the same cycle are unaffected.
    for url in good[:GOOD_FEEDS]:
        feed = feeds[url]
        assert feed.last_error is None and feed.consecutive_failures == 0, feed.last_error
        assert stored[ids[url]] == GOOD_ENTRIES
        assert polls[ids[url]].outcome == "ok"

    # Bounded time and memory: the slowest server costs the total timeout, not 20+ s. Memory
    # follows the cap, not the bodies: three oversized bodies in flight at once hold at most
    # about two caps each (chunks, then their join), never 50 MB or an entity expansion's GBs.
    print(
        f"hostile cycle: {len(result.polls)} feeds in {elapsed:.1f}s; body cap {CAP / MB:.1f} "
        f"MiB; peak RSS growth {peak.rss_growth / MB:.1f} MiB, peak Python allocations "
        f"{peak.traced_peak / MB:.1f} MiB"
    )
    assert elapsed < TOTAL_TIMEOUT + 10
    assert peak.traced_peak < 8 * CAP, peak
    assert peak.rss_growth < HUGE / 2, peak


def test_entity_expansion_is_refused_before_parsing_and_small_entities_still_parse() -> None:
    now = datetime.now(UTC)
    url = "https://hostile.example/feed.xml"
    for name, body in {
        "billion laughs": billion_laughs(),
        "quadratic blowup": quadratic_blowup(),
        "one-line DTD": quadratic_blowup(oneline=True),
        "UTF-16": quadratic_blowup().decode().encode("utf-16"),
        "UTF-32": quadratic_blowup(size=10_000, refs=1_000).decode().encode("utf-32"),
        "just past the limit": quadratic_blowup(size=1000, refs=MAX_ENTITY_EXPANSION // 1000 + 1),
    }.items():
        started = time.monotonic()
        with pytest.raises(FeedProblem) as caught:
            parse_document(body, {"content-type": "application/rss+xml"}, url, now)
        assert caught.value.kind == "parse", name
        assert url in caught.value.message and "entity-expansion" in caught.value.message, name
        assert time.monotonic() - started < 1.0, name
    parameter = (
        b'<?xml version="1.0"?>\n<!DOCTYPE rss [\n<!ENTITY % pe "<!ENTITY x \'y\'>">\n%pe;\n]>\n'
        + rss(1).split(b"\n", 1)[1]
    )
    with pytest.raises(FeedProblem, match="parameter entities"):
        parse_document(parameter, {}, url, now)
    # A feed that declares a small entity, and uses it, still parses (at the limit, too).
    small = (
        b'<?xml version="1.0"?>\n<!DOCTYPE rss [\n<!ENTITY org "the Coalition of the Willing">\n]>'
        b'\n<rss version="2.0"><channel><title>&org;</title><item><title>News of &org;</title>'
        b"<guid>s1</guid><description>About &org;.</description></item></channel></rss>"
    )
    parsed = parse_document(small, {}, url, now)
    assert [e.title for e in parsed.entries] == ["News of the Coalition of the Willing"]
    at_limit = quadratic_blowup(size=1000, refs=MAX_ENTITY_EXPANSION // 1000)
    assert len(parse_document(at_limit, {}, url, now, max_text_chars=5000).entries) == 1


def test_a_content_encoded_gzip_bomb_never_inflates_past_the_cap(feed_farm: FeedFarm) -> None:
    """httpx inflates each 64 KB network chunk in full (about 64 MB of a gzip bomb); the
    fetcher inflates Content-Encoding gzip/deflate itself, never past the cap. Honest
    gzip and deflate (zlib-wrapped or raw) bodies still decode."""
    cap = 1_000_000
    opts = options(max_body_bytes=cap)
    bomb = gzip.compress(b"\0" * (200 * MB), compresslevel=9)  # about 200 KB on the wire
    honest = rss(40, prefix="enc")
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    served = {
        "bomb": ("gzip", bomb),
        "gzip": ("gzip", gzip.compress(honest)),
        "x-gzip": ("x-gzip", gzip.compress(honest)),
        "zlib": ("deflate", zlib.compress(honest)),
        "raw": ("deflate", raw_deflate.compress(honest) + raw_deflate.flush()),
        "corrupt": ("gzip", gzip.compress(honest)[:40] + b"\xff" * 64),
    }
    urls = {
        name: feed_farm.reply(
            f"/encoded/{name}.xml", Reply(200, {"Content-Encoding": enc, **RSS_TYPE}, body)
        )
        for name, (enc, body) in served.items()
    }

    async def fetch_all() -> dict[str, FetchResult]:
        async with make_http_client(opts) as client:
            fetcher = Fetcher(client, opts)
            return {name: await fetcher.fetch(url) for name, url in urls.items()}

    tracemalloc.start()
    try:
        results = asyncio.run(fetch_all())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert results["bomb"].error_kind == "too_large"
    assert urls["bomb"] in (results["bomb"].error or "")
    assert peak < 4 * cap, f"peak {peak / MB:.1f} MiB while fetching a {len(bomb):,}-byte bomb"
    for name in ("gzip", "x-gzip", "zlib", "raw"):
        assert results[name].ok and results[name].body == honest, (name, results[name].error)
    assert results["corrupt"].error_kind == "parse"
    assert urls["corrupt"] in (results["corrupt"].error or "")


# --- hypothesis: malformed documents ----------------------------------------------------------

DATES = [
    "Tue, 06 Jan 2026 10:02:00 GMT", "2026-01-06T10:02:00Z", "6 gennaio 2026", "not a date",
    "", "31 Feb 2026 25:61:00 +9999", "9999-99-99", "Tue, 06 Jan 2126 10:02:00 GMT",
]  # fmt: skip
CONTENT_TYPES = [
    "application/rss+xml", "application/atom+xml; charset=utf-8", "text/xml", "text/html",
    "application/octet-stream", "text/xml; charset=bogus-charset",
    "application/xml; charset=utf-16", "",
]  # fmt: skip
TAGS = ["rss", "channel", "item", "title", "link", "guid", "description", "entry", "feed", "id"]
INSERTS = [
    "<![CDATA[", "]]>", "<!--", "-->", "<?pi ", "&nbsp;", "&#xD800;", "&#0;", "&#99999999;",
    "&undefined;", "&amp", "<", ">", "\x00", "\ufeff", "</channel>", "<item>", "</rss>",
    '<!DOCTYPE rss [<!ENTITY e "eee">]>', "<a href='javascript:alert(1)'>x</a>",
    "<script>alert(1)</script>", "\udcff",
]  # fmt: skip
ENCODINGS = ["utf-8", "utf-16", "latin-1", "utf-32", "cp1252", "shift_jis", "bogus-charset"]

entry_st = st.fixed_dictionaries(
    {
        "title": st.text(max_size=60),
        "text": st.text(max_size=300),
        "link": st.sampled_from(["https://x.example/a", "/relative", "javascript:x", "", "::"])
        | st.text(max_size=30),
        "guid": st.text(max_size=30),
        "date": st.sampled_from(DATES),
        "html": st.booleans(),
    }
)


def _document(kind: str, title: str, entries: list[dict[str, object]]) -> str:
    def text(value: object, html: bool = False) -> str:
        s = escape(str(value))
        return f"<p>{s}</p>" if html else s

    if kind == "atom":
        items = "".join(
            f'<entry><title>{text(e["title"])}</title><link href="{text(e["link"])}"/>'
            f"<id>{text(e['guid'])}</id><updated>{text(e['date'])}</updated>"
            f'<content type="{"html" if e["html"] else "text"}">'
            f"{escape(text(e['text'], bool(e['html'])))}</content></entry>"
            for e in entries
        )
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n<feed xmlns="http://www.w3.org/2005/Atom">'
            f"<title>{text(title)}</title>{items}</feed>"
        )
    if kind == "rdf":
        items = "".join(
            f"<item><title>{text(e['title'])}</title><link>{text(e['link'])}</link>"
            f"<description>{text(e['text'])}</description></item>"
            for e in entries
        )
        return (
            '<?xml version="1.0"?>\n<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"'
            ' xmlns="http://purl.org/rss/1.0/">'
            f"<channel><title>{text(title)}</title></channel>{items}</rdf:RDF>"
        )
    items = "".join(
        f"<item><title>{text(e['title'])}</title><link>{text(e['link'])}</link>"
        f"<guid>{text(e['guid'])}</guid><pubDate>{text(e['date'])}</pubDate>"
        f"<description>{escape(text(e['text'], bool(e['html'])))}</description></item>"
        for e in entries
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
        f"<title>{text(title)}</title>{items}</channel></rss>"
    )


@st.composite
def malformed_documents(draw: st.DrawFn) -> tuple[bytes, str]:
    """A feed document (RSS, Atom, RDF) with 1–4 mutations, or raw bytes; and a content type."""
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if draw(st.integers(0, 9)) == 0:
        prefix = draw(st.sampled_from([b"", b"<?xml version='1.0'?>", b"<rss>", b"\xef\xbb\xbf<"]))
        return prefix + draw(st.binary(max_size=3000)), content_type
    kind = draw(st.sampled_from(["rss", "atom", "rdf"]))
    doc = _document(kind, draw(st.text(max_size=40)), draw(st.lists(entry_st, max_size=6)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["truncate", "insert", "delete", "duplicate", "rename", "unclose",
                             "nest", "encoding"])
        )  # fmt: skip
        at = draw(st.integers(0, len(doc)))
        if op == "truncate":
            doc = doc[:at]
        elif op == "insert":
            doc = doc[:at] + draw(st.sampled_from(INSERTS) | st.text(max_size=12)) + doc[at:]
        elif op == "delete":
            doc = doc[:at] + doc[at + draw(st.integers(1, 40)) :]
        elif op == "duplicate":
            doc = doc[:at] + doc[at : at + draw(st.integers(1, 400))] + doc[at:]
        elif op == "rename":
            old, new = draw(st.sampled_from(TAGS)), draw(st.sampled_from([*TAGS, "x:y", "1bad"]))
            doc = doc.replace(f"<{old}>", f"<{new}>").replace(f"<{old} ", f"<{new} ")
        elif op == "unclose":
            doc = doc.replace(f"</{draw(st.sampled_from(TAGS))}>", "")
        elif op == "nest":
            depth = draw(st.integers(10, 3000))
            doc = doc[:at] + "<div>" * depth + "deep" + "</div>" * depth + doc[at:]
        else:
            doc = doc.replace('encoding="utf-8"', f'encoding="{draw(st.sampled_from(ENCODINGS))}"')
    codec = draw(st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252"]))
    return doc.encode(codec, "replace"), content_type


def check_parse(body: bytes, content_type: str, url: str) -> ParsedFeed | FeedProblem:
    """The contract: entries that are usable, or a FeedProblem naming the URL; nothing else."""
    headers = {"content-type": content_type} if content_type else {}
    try:
        parsed = parse_document(body, headers, url, datetime.now(UTC), max_text_chars=2000)
    except FeedProblem as problem:
        assert problem.kind in ("parse", "not_a_feed"), problem.kind
        assert url in problem.message, problem.message
        return problem
    for entry in parsed.entries:
        assert entry.guid and len(entry.guid) <= 1900
        assert entry.title.strip()
        assert len(entry.text) <= 2000 + 2
        assert entry.published_at.tzinfo is not None
        assert len(entry.content_hash) == 64
    return parsed


def test_malformed_documents_parse_tolerantly_or_fail_clearly_and_poll_cleanly(
    sessions: SessionFactory, feed_farm: FeedFarm
) -> None:
    examples: dict[bytes, tuple[str, ParsedFeed | FeedProblem]] = {}

    @settings(
        max_examples=int(os.environ.get("CW_FAULT_EXAMPLES", "120")),
        deadline=5000,  # ms per document: a pathological parse is a failure, not a hang
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(malformed_documents())
    def parse_one(generated: tuple[bytes, str]) -> None:
        body, content_type = generated
        examples[body] = (content_type, check_parse(body, content_type, "http://feeds.test/x"))

    parse_one()
    assert len(examples) >= 20

    # Then every generated document is served, and polled in one cycle with good feeds.
    opts = options(max_text_chars=2000)
    served: dict[str, ParsedFeed | FeedProblem] = {}
    for i, (body, (content_type, outcome)) in enumerate(examples.items()):
        headers = {"Content-Type": content_type} if content_type else {}
        served[feed_farm.reply(f"/fuzz/{i}.xml", Reply(200, headers, body))] = outcome
    good = feed_farm.generate(2, GOOD_ENTRIES)
    ids = add_feeds(sessions, [*served, *good], opts)
    result = asyncio.run(poll_once(sessions, opts))
    polls = {p.feed_id: p for p in result.polls}
    assert len(polls) == len(ids)
    assert not [p for p in result.polls if p.outcome == "internal_error"], result.summary()
    feeds = feeds_by_url(sessions)
    tolerant = failed = 0
    for url, outcome in served.items():
        feed, poll = feeds[url], polls[ids[url]]
        if isinstance(outcome, FeedProblem):
            failed += 1
            assert feed.last_error_kind == outcome.kind, (url, feed.last_error)
            assert feed.last_error and url in feed.last_error
        else:
            tolerant += 1
            assert feed.last_error is None, (url, feed.last_error)
            counts = poll.counts
            assert counts.added + counts.duplicates == len(outcome.entries), (url, counts)
    stored = article_counts(sessions)
    for url in good:
        assert feeds[url].last_error is None and stored[ids[url]] == GOOD_ENTRIES
    print(f"\n{len(served)} malformed documents: {tolerant} parsed tolerantly, {failed} refused")
