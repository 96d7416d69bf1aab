"""Scale-out on PostgreSQL: classification and polling throughput with 1 and 2 replicas, and
polling on SQLite vs PostgreSQL, in one run.

A "replica" here is a separate worker process with its own engine, connection pool and (for
classification) its own model, running exactly what a ``coalition-watch run`` replica's job runs:
``classify_pending`` (claim a batch with ``FOR UPDATE SKIP LOCKED`` → embed → classify → store)
or ``FeedCollector.poll_due`` (claim due feeds → fetch → parse → store, with the cross-feed
dedup lock). Workers load everything first and wait at a common start; the time is from that
start until the last worker finds nothing left. Every run uses a fresh database.

- polling: F feeds × E entries served by a local HTTP server in its own process (the ingest
  benchmark's synthetic feeds); feeds/s and entries/s stored; SQLite (1 replica) vs
  PostgreSQL (1 and 2 replicas);
- classification: N stored articles of coalition news (about 150 tokens each); articles/s with
  1 replica using every core, 2 replicas splitting the cores, and 2 replicas each using every
  core (the default ``classifier.threads = 0``).

    python benchmarks/replicas.py
    REPLICAS_BENCH_FEEDS=300 REPLICAS_BENCH_ENTRIES=20 REPLICAS_BENCH_ARTICLES=480 \\
    REPLICAS_BENCH_ROUNDS=3 REPLICAS_BENCH_CLASSIFY_ROUNDS=2 python benchmarks/replicas.py

PostgreSQL: ``COALITION_WATCH_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:
5432/test``); a database is created and dropped per run. Medians over the rounds are printed.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import serve

from collectors.feeds import FeedCollector, FeedOptions, add_feed
from collectors.fetch import make_http_client
from collectors.normalize import detect_language
from collectors.seeds import content_hash
from storage import migrate
from storage.db import (
    SessionFactory,
    make_engine,
    scratch_postgres_database,
    session_factory,
    transaction,
)
from storage.models import Article, ArticleStatus, utcnow

PG_ADMIN_URL = os.environ.get(
    "COALITION_WATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CORES = len(os.sched_getaffinity(0))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# --- databases ------------------------------------------------------------------------------


def pg_database() -> AbstractContextManager[str]:
    return scratch_postgres_database(PG_ADMIN_URL, "cw_bench")


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/bench.db"


# --- workers (separate processes: one engine, one pool, one model each) ----------------------


# A worker process stays up across rounds: it sets up once (the model, the language detector),
# then for each round receives a database URL, opens its pool, answers "ready", waits for "go",
# works until nothing is left and answers (end time, units done, entries added). None ends it.

WorkerResult = tuple[float, int, int]  # (monotonic end time, units done, entries added)


def _poll_worker(name: str, conn: Connection) -> None:
    options = poll_options()
    detect_language("the language model loads once per process, before any round")
    conn.send("loaded")
    while (url := conn.recv()) is not None:
        engine = make_engine(url)
        sessions = session_factory(engine)
        engine.connect().close()  # the pool's first connection, before the start

        async def run(sessions: SessionFactory) -> tuple[int, int]:
            async with make_http_client(options) as client:
                collector = FeedCollector(
                    options, client=client, sessions=sessions, clock=utcnow, owner=name
                )
                conn.send("ready")
                conn.recv()  # go
                result = await collector.poll_due()
                return len([p for p in result.polls if p.outcome == "ok"]), result.added

        feeds, added = asyncio.run(run(sessions))
        conn.send((time.monotonic(), feeds, added))
        engine.dispose()


def _classify_worker(name: str, threads: int, conn: Connection) -> None:
    from processors.classifier import ClassifierOptions, load_classifier
    from processors.classify import classify_pending

    options = ClassifierOptions(threads=threads)
    classifier = load_classifier(options)
    classifier.embed(["query: a first pass, so that one-time setup is not timed"])
    conn.send("loaded")
    while (url := conn.recv()) is not None:
        engine = make_engine(url)
        sessions = session_factory(engine)
        engine.connect().close()
        conn.send("ready")
        conn.recv()  # go
        result = classify_pending(
            sessions, classifier, owner=name, clock=utcnow, options=options.stage_options()
        )
        conn.send((time.monotonic(), result.stored, 0))
        engine.dispose()


def _expect(conn: Connection, seconds: float, what: str) -> Any:
    if not conn.poll(seconds):
        raise RuntimeError(f"a worker did not {what} within {seconds:.0f} s")
    return conn.recv()


class Workers:
    """Replica processes (spawned: no fork after torch or SQLAlchemy state exists)."""

    def __init__(self, target: Callable[..., None], args_for: list[tuple[Any, ...]]) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for args in args_for:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=target, args=(*args, there), daemon=True)
            proc.start()
            self.procs.append(proc)
            self.conns.append(here)
        for conn in self.conns:
            _expect(conn, 300, "load")

    def run(self, url: str) -> tuple[float, list[WorkerResult]]:
        """One round on ``url``: all start together; seconds until the last one is done."""
        for conn in self.conns:
            conn.send(url)
        for conn in self.conns:
            _expect(conn, 120, "get ready")
        began = time.monotonic()
        for conn in self.conns:
            conn.send("go")
        results: list[WorkerResult] = [_expect(c, 900, "finish") for c in self.conns]
        return max(end for end, _n, _m in results) - began, results

    def close(self) -> None:
        for conn in self.conns:
            with suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


# --- polling --------------------------------------------------------------------------------


def poll_options() -> FeedOptions:
    # All synthetic feeds are on one host: lift the per-host limit to the global one. Small
    # claim batches so that two replicas really share the feeds.
    return FeedOptions(per_host_concurrency=20, max_concurrency=20, claim_batch=20)


@dataclass
class Run:
    seconds: float
    units: int  # feeds polled, or articles classified
    entries: int = 0  # entries stored (polling)
    shares: tuple[int, ...] = ()


def polling_run(url: str, workers: Workers, port: int, feeds: int, entries: int) -> Run:
    migrate.upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    with transaction(session_factory(engine)) as session:
        for n in range(feeds):
            add_feed(session, f"http://127.0.0.1:{port}/feed/{n}.xml", poll_options(), now)
    wall, results = workers.run(url)
    with engine.connect() as conn:
        stored = int(conn.execute(sa.text("SELECT count(*) FROM article")).scalar_one())
        polled = int(
            conn.execute(
                sa.text("SELECT count(*) FROM feed WHERE last_success_at IS NOT NULL")
            ).scalar_one()
        )
    engine.dispose()
    assert polled == feeds and stored == feeds * entries, (polled, stored)
    assert sum(r[1] for r in results) == feeds, "a feed was polled twice"
    return Run(wall, polled, stored, tuple(r[1] for r in results))


# --- classification ---------------------------------------------------------------------------

_EN = [
    "Leaders of the coalition of the willing met in Paris to plan a reassurance force for "
    "Ukraine that would deploy once a ceasefire holds.",
    "The Kremlin warned that any European troops in Ukraine would be a legitimate target and "
    "rejected the coalition's plan.",
    "Washington is weighing air and intelligence support as a backstop for the European force, "
    "officials said after the meeting.",
    "Negotiators resumed ceasefire talks with a new draft on monitoring the contact line and "
    "the exchange of prisoners.",
    "Ministers agreed a new package of sanctions against Russian banks and the shadow fleet "
    "that carries oil around the embargo.",
    "Forecasters expect heavy rain over the weekend and advised drivers to take care on the "
    "motorways in the north.",
]
_IT = [
    "I leader dei volenterosi hanno discusso a Roma le garanzie di sicurezza per Kiev e il "
    "ruolo degli Stati Uniti come sostegno della missione.",
    "Il Cremlino ha respinto il piano europeo e ha definito una provocazione l'invio di truppe "
    "occidentali in Ucraina.",
    "Il governo ha approvato un nuovo pacchetto di aiuti militari con sistemi di difesa aerea e "
    "munizioni per l'artiglieria.",
    "Sono ripresi i negoziati sul cessate il fuoco con una nuova bozza sul monitoraggio della "
    "linea di contatto.",
    "Bruxelles prepara nuove sanzioni contro le banche russe e la flotta ombra che trasporta "
    "il petrolio aggirando l'embargo.",
    "Il consiglio comunale ha approvato nuove piste ciclabili e i lavori partiranno in "
    "primavera, con un bilancio condiviso.",
]


def article_text(n: int) -> tuple[str, str, str]:
    """(language, title, text): four sentences of one language, unique by the report line."""
    language, pool = ("en", _EN) if n % 2 else ("it", _IT)
    picks = [pool[(n * 5 + k) % len(pool)] for k in range(4)]
    title = picks[0].split(",")[0][:90]
    text = " ".join(picks) + f" (Report {n}, updated at {n % 24:02d}:{n % 60:02d}.)"
    return language, title, text


def classify_run(url: str, workers: Workers, articles: int) -> Run:
    migrate.upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    rows = []
    for n in range(articles):
        language, title, text = article_text(n)
        rows.append(
            {
                "uid": f"bench:{n}", "source": "feed", "guid": f"g{n}",
                "url": f"https://news.example.org/{n}", "outlet": f"Outlet {n % 17}",
                "title": title, "text": text, "language": language,
                "published_at": now, "fetched_at": now,
                "content_hash": content_hash(title, text), "status": ArticleStatus.NEW,
            }
        )  # fmt: skip
    with transaction(session_factory(engine)) as session:
        session.execute(sa.insert(Article), rows)
    wall, results = workers.run(url)
    with engine.connect() as conn:
        done = int(conn.execute(sa.text("SELECT count(*) FROM classification")).scalar_one())
    engine.dispose()
    assert done == articles, (done, articles)
    assert sum(r[1] for r in results) == articles, "an article was classified twice"
    return Run(wall, done, shares=tuple(r[1] for r in results))


# --- main -----------------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]


def fmt(runs: list[Run]) -> str:
    spread = ", ".join(f"{r.seconds:.1f}" for r in runs)
    return f"(runs: {spread} s)"


def main() -> None:
    feeds = env_int("REPLICAS_BENCH_FEEDS", 300)
    entries = env_int("REPLICAS_BENCH_ENTRIES", 20)
    articles = env_int("REPLICAS_BENCH_ARTICLES", 480)
    rounds = env_int("REPLICAS_BENCH_ROUNDS", 3)
    classify_rounds = env_int("REPLICAS_BENCH_CLASSIFY_ROUNDS", 2)

    started = time.monotonic()
    receive, send = mp.Pipe(duplex=False)
    server = mp.get_context("fork").Process(target=serve, args=(feeds, entries, send), daemon=True)
    server.start()
    port = receive.recv()
    polling: dict[str, list[Run]] = {"sqlite-1": [], "pg-1": [], "pg-2": []}
    pollers = {n: Workers(_poll_worker, [(f"poller-{i}",) for i in range(n)]) for n in (1, 2)}
    try:
        for _ in range(rounds):  # interleaved, so load from elsewhere hits every setup alike
            with sqlite_database() as url:
                polling["sqlite-1"].append(polling_run(url, pollers[1], port, feeds, entries))
            for n in (1, 2):
                with pg_database() as url:
                    polling[f"pg-{n}"].append(polling_run(url, pollers[n], port, feeds, entries))
    finally:
        for workers in pollers.values():
            workers.close()
        server.terminate()
        server.join(timeout=5)

    split = max(1, CORES // 2)
    setups = {f"pg-1x{CORES}": (1, CORES), f"pg-2x{split}": (2, split)}
    if split != CORES:
        setups[f"pg-2x{CORES}"] = (2, CORES)
    classifying: dict[str, list[Run]] = {k: [] for k in setups}
    for key, (replicas, threads) in setups.items():  # one set of models at a time in memory
        workers = Workers(_classify_worker, [(f"classifier-{i}", threads) for i in range(replicas)])
        try:
            for _ in range(classify_rounds):
                with pg_database() as url:
                    classifying[key].append(classify_run(url, workers, articles))
        finally:
            workers.close()
    total = time.monotonic() - started

    print(
        f"scale-out on PostgreSQL: {CORES} usable cores, {os.cpu_count()} CPUs; medians of "
        f"{rounds} polling rounds and {classify_rounds} classification rounds ({total:.0f} s)"
    )
    print(f"polling: {feeds} feeds x {entries} entries, server in its own process")
    rates: dict[str, float] = {}
    for key, runs in polling.items():
        r = median_run(runs)
        backend, count = key.split("-")
        rates[key] = r.entries / r.seconds
        print(
            f"  {backend:<10} {count} replica(s): {r.seconds:6.2f} s -> {r.units / r.seconds:7.1f} "
            f"feeds/s, {r.entries / r.seconds:7.0f} entries/s; feeds per replica {r.shares} "
            f"{fmt(runs)}"
        )
    print(
        f"  ratios: PostgreSQL/SQLite (1 replica) {rates['pg-1'] / rates['sqlite-1']:.2f}x, "
        f"PostgreSQL 2 replicas / 1 replica {rates['pg-2'] / rates['pg-1']:.2f}x"
    )
    print(f"classification: {articles} articles (about 150 tokens each), replicas x torch threads")
    crates: dict[str, float] = {}
    for key, runs in classifying.items():
        r = median_run(runs)
        crates[key] = r.units / r.seconds
        replicas, threads = setups[key]
        print(
            f"  {replicas} replica(s) x {threads} thread(s): {r.seconds:6.2f} s -> "
            f"{crates[key]:6.1f} articles/s; articles per replica {r.shares} {fmt(runs)}"
        )
    base = crates[f"pg-1x{CORES}"]
    for key in setups:
        if key != f"pg-1x{CORES}":
            replicas, threads = setups[key]
            print(
                f"  ratio {replicas} replicas x {threads} thread(s) / 1 replica x {CORES}: "
                f"{crates[key] / base:.2f}x"
            )


if __name__ == "__main__":
    main()
