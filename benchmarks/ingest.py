"""Feed ingestion speed: entries/s from fetch to stored row, a 304 cycle, cost vs feedparser.

A local HTTP server (in its own process, so it does not share our interpreter) serves N
synthetic RSS feeds of M entries each, with ETag/Last-Modified. The collector polls them all
into a fresh SQLite database (cold cycle), then polls them again with the clock moved past
every next check: each feed answers 304 (steady-state cycle). Finally the same documents are
given to a bare ``feedparser.parse`` to compare the pipeline's cost per entry.

    python benchmarks/ingest.py [FEEDS [ENTRIES [CYCLES]]]
    INGEST_FEEDS=100 INGEST_ENTRIES=20 python benchmarks/ingest.py

Defaults: 500 feeds × 50 entries, 3 steady-state cycles (median reported).
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import feedparser
import sqlalchemy as sa

from collectors.feeds import FeedCollector, FeedOptions, PollResult, add_feed
from collectors.fetch import make_http_client
from collectors.normalize import detect_language
from collectors.parse import parse_document
from storage import migrate
from storage.db import SessionFactory, make_engine, session_factory, transaction

WORDS = [
    "coalition",
    "ministers",
    "ceasefire",
    "guarantees",
    "force",
    "Ukraine",
    "Kyiv",
    "Paris",
    "London",
    "Rome",
    "Brussels",
    "talks",
    "security",
    "monitoring",
    "troops",
    "deployment",
    "sanctions",
    "aid",
    "Russia",
    "Moscow",
    "envoy",
    "summit",
    "governo",
    "difesa",
    "garanzie",
    "volenterosi",
    "missione",
    "truppe",
    "accordo",
    "negoziati",
    "Mosca",
    "sostegno",
]
START = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def synthetic_feed(feed: int, entries: int) -> bytes:
    """One RSS 2.0 document; every entry unique, HTML descriptions, a few entities."""
    language = "" if feed % 5 == 0 else f"<language>{'it' if feed % 2 else 'en'}</language>"
    items = []
    for i in range(entries):
        seed = feed * 7919 + i * 104729
        words = [WORDS[(seed >> k) % len(WORDS)] for k in range(60)]
        para1 = " ".join(words[:30]).capitalize()
        para2 = " ".join(words[30:]).capitalize()
        when = START - timedelta(minutes=37 * i + feed % 60)
        items.append(
            "<item>"
            f"<title>Story {feed}-{i}: {' '.join(words[:8])} &amp; more</title>"
            f"<link>https://news{feed % 40}.example.org/{feed}/{i}.html?utm_source=rss</link>"
            f'<guid isPermaLink="false">feed{feed}-entry{i}</guid>'
            f"<pubDate>{format_datetime(when)}</pubDate>"
            f"<description>&lt;p&gt;{para1} (id {seed}).&lt;/p&gt;&lt;p&gt;{para2} &amp;#8211; "
            f"l&amp;#39;ultima ora.&lt;/p&gt;</description>"
            "</item>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel>'
        f"<title>Synthetic feed {feed}</title><link>https://news{feed % 40}.example.org/</link>"
        f"{language}{''.join(items)}</channel></rss>"
    ).encode()


def serve(feeds: int, entries: int, port_out: mp.connection.Connection) -> None:
    docs = {f"/feed/{n}.xml": synthetic_feed(n, entries) for n in range(feeds)}
    tags = {path: '"' + hashlib.sha1(body).hexdigest()[:16] + '"' for path, body in docs.items()}
    stamp = format_datetime(START, usegmt=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out at once

        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            body = docs.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            tag = tags[self.path]
            if self.headers.get("If-None-Match") == tag:
                self.send_response(304)
                self.send_header("ETag", tag)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/rss+xml")
            self.send_header("ETag", tag)
            self.send_header("Last-Modified", stamp)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_out.send(server.server_address[1])
    server.serve_forever()


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


async def poll(options: FeedOptions, sessions: SessionFactory, clock: Clock) -> PollResult:
    async with make_http_client(options) as client:
        collector = FeedCollector(
            options, client=client, sessions=sessions, clock=clock, owner="bench"
        )
        return await collector.poll_due()


def main() -> None:
    args = sys.argv[1:]
    feeds = int(args[0] if args else os.environ.get("INGEST_FEEDS", 500))
    entries = int(args[1] if len(args) > 1 else os.environ.get("INGEST_ENTRIES", 50))
    cycles = int(args[2] if len(args) > 2 else os.environ.get("INGEST_CYCLES", 3))

    receive, send = mp.Pipe(duplex=False)
    server = mp.Process(target=serve, args=(feeds, entries, send), daemon=True)
    server.start()
    port = receive.recv()
    # All synthetic feeds live on one host: lift the per-host limit to the global one.
    options = FeedOptions(per_host_concurrency=20, max_concurrency=20, claim_batch=1000)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            migrate.upgrade(url)
            engine = make_engine(url)
            sessions = session_factory(engine)
            clock = Clock()
            with transaction(sessions) as session:
                for n in range(feeds):
                    add_feed(session, f"http://127.0.0.1:{port}/feed/{n}.xml", options, clock())

            # The language model loads once per process, on first use: not part of a cycle.
            started = time.perf_counter()
            detect_language("the language model loads once per process, on first use")
            model_seconds = time.perf_counter() - started

            started = time.perf_counter()
            cold = asyncio.run(poll(options, sessions, clock))
            cold_seconds = time.perf_counter() - started
            with engine.connect() as conn:
                stored = conn.execute(sa.text("select count(*) from article")).scalar_one()

            steady = []
            for _ in range(cycles):
                clock.now += timedelta(days=2)  # past every feed's next check
                started = time.perf_counter()
                result = asyncio.run(poll(options, sessions, clock))
                steady.append(time.perf_counter() - started)
                outcomes = result.outcomes
                assert outcomes["not_modified"] == feeds, outcomes
            engine.dispose()
    finally:
        server.terminate()
        server.join(timeout=5)

    docs = [synthetic_feed(n, entries) for n in range(feeds)]
    started = time.perf_counter()
    bare_entries = sum(len(feedparser.parse(doc).entries) for doc in docs)
    bare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    headers = {"content-type": "application/rss+xml"}
    ours = sum(len(parse_document(doc, headers, "http://x/", START).entries) for doc in docs)
    parse_seconds = time.perf_counter() - started

    assert stored == feeds * entries == bare_entries == ours, (stored, bare_entries, ours)
    per_entry = cold_seconds / stored
    bare_per_entry = bare_seconds / bare_entries
    med = statistics.median(steady)
    print(f"feed ingestion: {feeds} feeds x {entries} entries, SQLite, server in its own process")
    print(f"  language model load (once per process, before the cycles): {model_seconds:.2f} s")
    print(
        f"  cold cycle (fetch -> parse -> normalize -> dedup -> stored row): {stored} entries "
        f"in {cold_seconds:.2f} s -> {stored / cold_seconds:.0f} entries/s "
        f"({cold.outcomes['ok']} feeds ok)"
    )
    print(
        f"  steady-state cycle, every feed answers 304: median {med:.2f} s over {cycles} cycles "
        f"({med / feeds * 1000:.2f} ms per feed; min {min(steady):.2f} s, max {max(steady):.2f} s)"
    )
    print(
        f"  cost per entry: pipeline {per_entry * 1000:.3f} ms, bare feedparser.parse "
        f"{bare_per_entry * 1000:.3f} ms -> ratio {per_entry / bare_per_entry:.2f}x"
    )
    print(
        f"  parse + normalize alone: {parse_seconds / ours * 1000:.3f} ms per entry -> "
        f"{parse_seconds / bare_seconds:.2f}x bare feedparser.parse"
    )


if __name__ == "__main__":
    main()
