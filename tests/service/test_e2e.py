"""End to end, the way people run it: ``coalition-watch run`` as a subprocess on a free port, a
temporary SQLite database, a local feed server, a real SMTP server (aiosmtpd) and a real webhook
receiver that verifies signatures (issues 5 and 6).

One service, started once for this module, serves the tests in order: ``/readyz`` waits for
the model; the seeds and the feed's items are listed by the API with their classification and
counted in ``/metrics``; writes need the token; a feed that gains a coalition article notifies
once by webhook and once by email (the time from the feed change is printed and logged); a
300-article feed is classified while ``/healthz`` is probed; SIGTERM and ``kill -9`` in the
middle of classification lose nothing and classify nothing twice. A probe times every
``/healthz`` request over the whole run.

The intervals are shortened through the settings (``[feeds]``, ``[classifier]``, ``[alerts]``
in a TOML file) so a pass takes seconds, not minutes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, formatdate
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import col, select

from storage.db import SessionFactory, make_engine, session_factory
from storage.models import Alert, Article, ArticleStatus, Classification, Delivery, Feed
from tests.alerts.conftest import SmtpServer, WebhookReceiver, targets_toml
from tests.collectors.feedserver import FeedServer, Reply, Request, conditional
from tests.conftest import REPO, ServiceProcess, free_port

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # the measured figures reach the test's captured log

TOKEN = "e2e-token-4f1c9a"
# /healthz while a batch is classified: p99 within the budget, and never a stall. On a shared
# 2-core machine a rare request also waits for the whole machine (other processes); an event
# loop blocked by the work itself shows as a slow p99 and as stalls as long as a batch.
HEALTHZ_BUDGET = 0.100
HEALTHZ_STALL = 0.500
BULK = 300
LEFT_TO_LEASES = "leaving them to their leases"  # the runner's line when its grace runs out

# --- feeds that change while the service runs ------------------------------------------------


@dataclass(frozen=True)
class Item:
    guid: str
    title: str
    text: str
    link: str
    published: datetime


def rss(title: str, link: str, items: list[Item]) -> bytes:
    entries = "".join(
        f'<item><guid isPermaLink="false">{escape(i.guid)}</guid>'
        f"<title>{escape(i.title)}</title><link>{escape(i.link)}</link>"
        f"<pubDate>{format_datetime(i.published)}</pubDate>"
        f"<description>{escape(i.text)}</description></item>"
        for i in items
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
        f"<title>{escape(title)}</title><link>{escape(link)}</link>"
        f"<description>{escape(title)}</description>{entries}</channel></rss>"
    ).encode()


class LiveFeed:
    """An RSS document that a test can change while the service polls it (ETag follows it)."""

    def __init__(self, title: str, items: list[Item]) -> None:
        self.title = title
        self.items = list(items)
        self.modified = time.time() - 3600
        self.lock = threading.Lock()

    def handle(self, request: Request) -> Reply:
        with self.lock:
            body = rss(self.title, "https://e2e-news.example/", self.items)
            stamp = formatdate(self.modified, usegmt=True)
        return conditional(body, "application/rss+xml; charset=utf-8", last_modified=stamp)(request)

    def publish(self, item: Item) -> None:
        with self.lock:
            self.items.insert(0, item)
            self.modified = time.time()


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


OFF_TOPIC = [
    Item(
        "news-1", "Serie A: l'Inter vince il derby e torna in testa alla classifica",
        "Milano. Due gol nel secondo tempo decidono il derby di San Siro: l'Inter batte il "
        "Milan e torna prima in classifica. L'allenatore elogia la difesa e il centrocampo.",
        "https://e2e-news.example/sport/derby", _now() - timedelta(hours=3),
    ),
    Item(
        "news-2", "Cold front brings heavy snow to the Alps this weekend",
        "Forecasters expect up to a metre of fresh snow above 1,500 metres, with avalanche "
        "warnings in several valleys and ski resorts opening early for the season.",
        "https://e2e-news.example/weather/alps-snow", _now() - timedelta(hours=2),
    ),
    Item(
        "news-3", "La ricetta del risotto alla milanese, passo dopo passo",
        "Zafferano, brodo di carne e un buon burro: il segreto del risotto alla milanese è "
        "la tostatura del riso e la mantecatura finale con il parmigiano grattugiato.",
        "https://e2e-news.example/cucina/risotto", _now() - timedelta(hours=1),
    ),
]  # fmt: skip

COALITION_ITEM = Item(
    "news-4",
    "Coalition of the willing agrees to deploy a reassurance force in Ukraine after a ceasefire",
    "Paris. The leaders of the coalition of the willing agreed today on the security guarantees "
    "for Ukraine: a multinational reassurance force led by France and the United Kingdom will "
    "deploy once a ceasefire holds, with the United States providing a backstop. Kyiv welcomed "
    "the commitment; the coalition's chiefs of staff will present the plan within a week.",
    "https://e2e-news.example/world/coalition-reassurance-force",
    _now(),
)

SUBJECTS = [
    ("European leaders discuss troops for Ukraine", "The coalition of the willing met to "
     "discuss a reassurance force and security guarantees for Kyiv"),
    ("Il Cremlino respinge la forza europea", "Mosca avverte che truppe europee in Ucraina "
     "sarebbero un obiettivo legittimo e respinge il piano dei volenterosi"),
    ("Local council approves a new cycling lane", "The council voted for a protected cycling "
     "lane along the river, to be built over the summer"),
    ("Borsa di Milano chiude in rialzo", "Piazza Affari guadagna grazie ai titoli bancari e "
     "all'energia, lo spread resta stabile"),
    ("Ceasefire talks resume in Istanbul", "Negotiators from Kyiv and Moscow resumed talks on a "
     "ceasefire, with American and Turkish mediators in the room"),
    ("Nuovo museo apre a Torino", "Il museo dedicato al design italiano apre le porte con una "
     "mostra sugli oggetti di uso quotidiano del Novecento"),
]  # fmt: skip
PLACES = ["Rome", "Berlin", "Warsaw", "Madrid", "Oslo", "Vienna", "Lisbon", "Prague", "Riga",
          "Dublin"]  # fmt: skip


def bulk_items(prefix: str, count: int) -> list[Item]:
    """``count`` short, distinct articles (different guid, link and text)."""
    items = []
    for n in range(count):
        title, text = SUBJECTS[n % len(SUBJECTS)]
        place = PLACES[(n // len(SUBJECTS)) % len(PLACES)]
        items.append(
            Item(
                f"{prefix}-{n}", f"{title} ({place}, #{n})",
                f"{place}, item {n}. {text}. Report number {n} of the {prefix} desk.",
                f"https://e2e-bulk.example/{prefix}/{n}", _now() - timedelta(minutes=n),
            )
        )  # fmt: skip
    return items


# --- a /healthz probe for the whole run ------------------------------------------------------


class HealthProbe:
    """Requests ``/healthz`` every 50 ms on a fresh connection, as a liveness probe does."""

    def __init__(self, base: str) -> None:
        self.url = base + "/healthz"
        self.samples: list[tuple[float, float]] = []  # (monotonic start, seconds), 200s only
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="healthz-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=5, limits=limits) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    r = client.get(self.url)
                    seconds = time.monotonic() - started
                    if r.status_code == 200:
                        self.samples.append((started, seconds))
                    else:
                        self.errors.append((started, f"HTTP {r.status_code}"))
                except httpx.HTTPError as exc:
                    self.errors.append((started, f"{exc.__class__.__name__}: {exc}"))
                self._stop.wait(0.05)

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [s for t, s in list(self.samples) if start <= t <= end]

    def errors_between(self, start: float, end: float) -> list[str]:
        return [e for t, e in list(self.errors) if start <= t <= end]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def assert_fast(latencies: list[float]) -> None:
    assert p99(latencies) < HEALTHZ_BUDGET, summary(latencies)
    assert max(latencies) < HEALTHZ_STALL, summary(latencies)


def summary(latencies: list[float]) -> str:
    if not latencies:
        return "no samples"
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2]
    return (
        f"{len(ordered)} requests, p50 {p50 * 1000:.1f} ms, p99 {p99(ordered) * 1000:.1f} ms, "
        f"max {ordered[-1] * 1000:.1f} ms"
    )


def report(record: Callable[[str, object], None], name: str, value: float, line: str) -> None:
    """A measured figure: printed (``pytest -s``), logged, and kept in the JUnit properties."""
    print(f"\n[e2e] {line}")
    log.info("e2e: %s", line)
    record(name, round(value, 4))


# --- the service under test ------------------------------------------------------------------


class Service(ServiceProcess):
    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, svc: Service) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if svc.proc is not None and svc.proc.poll() is not None:
            raise AssertionError(f"the service exited while waiting for {what}:\n{svc.log_tail()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{svc.log_tail()}")


@dataclass
class E2E:
    svc: Service
    server: FeedServer
    news: LiveFeed
    news_url: str
    hook: WebhookReceiver
    smtp: SmtpServer
    probe: HealthProbe
    sessions: SessionFactory
    readyz_seen: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    time_to_ready: float = 0.0
    classify_windows: list[tuple[float, float]] = field(default_factory=list)

    def wait_ready(self, timeout: float = 180) -> list[tuple[int, dict[str, Any]]]:
        """Poll ``/readyz`` until 200; every answer seen on the way."""
        seen: list[tuple[int, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.svc.proc is not None
            if self.svc.proc.poll() is not None:
                raise AssertionError(f"the service exited at start:\n{self.svc.log_tail()}")
            try:
                r = httpx.get(self.svc.base + "/readyz", timeout=5)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                return seen
            time.sleep(0.1)
        raise AssertionError(
            f"/readyz not 200 after {timeout}s: {seen[-3:]}\n{self.svc.log_tail()}"
        )

    def restart(self, instance_id: str) -> float:
        """Start the service again under another instance id; when it was ready (monotonic)."""
        self.svc.env["COALITION_WATCH_INSTANCE_ID"] = instance_id
        self.svc.start()
        self.wait_ready()
        return time.monotonic()

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.svc.base + path, params=params, timeout=10)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def write(self, method: str, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.svc.base + path, headers=headers, timeout=10, **kw)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        body = httpx.get(self.svc.base + "/metrics", timeout=10).text
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }

    def feed_articles(self, feed_id: int) -> tuple[int, int]:
        """(stored, classified) articles of one feed."""
        with self.sessions() as s:
            stored = s.execute(
                sa.select(sa.func.count()).where(col(Article.feed_id) == feed_id)
            ).scalar_one()
            done = s.execute(
                sa.select(sa.func.count()).where(
                    col(Article.feed_id) == feed_id, col(Article.status) != ArticleStatus.NEW
                )
            ).scalar_one()
        return int(stored), int(done)

    def all_classified(self, feed_id: int, total: int) -> bool:
        """No article anywhere is waiting, and all ``total`` of the feed's are classified."""
        with self.sessions() as s:
            pending = s.execute(
                sa.select(sa.func.count()).where(col(Article.status) == ArticleStatus.NEW)
            ).scalar_one()
        return pending == 0 and self.feed_articles(feed_id) == (total, total)

    def classification_counts(self) -> tuple[int, list[int]]:
        """(articles stored, number of classifications of each classified article)."""
        with self.sessions() as s:
            articles = s.execute(sa.select(sa.func.count(col(Article.id)))).scalar_one()
            per_article = s.execute(
                sa.select(sa.func.count())
                .select_from(Classification)
                .group_by(col(Classification.article_id))
            ).all()
        return int(articles), [int(n) for (n,) in per_article]


def metric(
    values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and want <= ls)


def write_config(folder: Path, news_url: str, hook: WebhookReceiver, smtp: SmtpServer) -> Path:
    rules = folder / "rules.yaml"
    rules.write_text(
        f"""\
rules:
  - name: e2e-coalition
    description: Coalition news from the end-to-end test's feed.
    match:
      relevant: true
      topics_any: [reassurance_force, security_guarantees, coalition_diplomacy]
      feeds: ["{news_url}"]
    group_by: [story]
    group_wait: 0s
    repeat_interval: 1h
    severity: warning
""",
        encoding="utf-8",
    )
    config = folder / "coalition-watch.toml"
    config.write_text(
        f"""\
[feeds]                    # poll every second instead of every 15 minutes
job_interval = 0.5
default_interval = 1
min_interval = 1
adaptive = false
connect_timeout = 2
total_timeout = 5
lease_seconds = 10
backoff_base = 1
backoff_cap = 2

[classifier]
interval = 0.5
claim_batch = 16           # short batches: a SIGTERM finds the one in flight done quickly
lease_seconds = 10         # a batch held by a killed process is free again after 10 s

[alerts]
rules = "{rules}"
evaluate_interval = 0.3
deliver_interval = 0.3
lease = "30s"

"""
        + targets_toml(hook.url, smtp.port, hook="ops-hook", desk="desk-mail"),
        encoding="utf-8",
    )
    return config


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    folder = tmp_path_factory.mktemp("e2e")
    server = FeedServer().start()
    news = LiveFeed("E2E Notizie", OFF_TOPIC)
    news_url = server.route("/news.xml", news.handle)
    hook = WebhookReceiver()
    smtp = SmtpServer()
    smtp.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    port = free_port()
    db_url = f"sqlite:///{folder / 'e2e.db'}"
    env.update(
        COALITION_WATCH_CONFIG=str(write_config(folder, news_url, hook, smtp)),
        COALITION_WATCH_DATABASE_URL=db_url,
        COALITION_WATCH_HTTP__PORT=str(port),
        COALITION_WATCH_SEEDS_DIR=str(REPO / "seeds"),
        COALITION_WATCH_API_TOKEN=TOKEN,
        COALITION_WATCH_INSTANCE_ID="e2e-run-1",
        PYTHONPATH=str(REPO),
    )
    svc = Service(folder, env, port)
    engine = make_engine(db_url)
    probe = HealthProbe(svc.base)
    state = E2E(svc, server, news, news_url, hook, smtp, probe, session_factory(engine))
    try:
        svc.cli("db", "upgrade")
        added = svc.cli("feeds", "add", news_url)
        assert "E2E Notizie" in added.stdout + added.stderr, added
        started = time.monotonic()
        svc.start()
        probe.start()
        state.readyz_seen = state.wait_ready()
        state.time_to_ready = time.monotonic() - started
        yield state
    finally:
        probe.stop()
        log.info("e2e: /healthz over the whole run: %s", summary(probe.latencies()))
        svc.kill()
        engine.dispose()
        hook.close()
        smtp.stop()
        server.stop()


# --- issue 6: the service as users see it ----------------------------------------------------


@pytest.mark.slow
def test_readyz_says_model_loading_until_the_classifier_is_loaded(
    e2e: E2E, record_property: Callable[[str, object], None]
) -> None:
    not_ready = [body for status, body in e2e.readyz_seen if status != 200]
    assert not_ready, "the model loads at start: /readyz should answer 503 for a while first"
    assert {tuple(body["reasons"]) for body in not_ready} == {("model: loading",)}, not_ready
    assert all(status in (200, 503) for status, _ in e2e.readyz_seen)
    assert e2e.api("/readyz") == {"status": "ok"}
    assert "classifier multilingual-e5-small" in e2e.svc.log.read_text()
    report(
        record_property, "seconds_to_ready", e2e.time_to_ready,
        f"start → /readyz 200 (model loaded): {e2e.time_to_ready:.1f} s",
    )  # fmt: skip


@pytest.mark.slow
def test_seeds_and_feed_items_are_listed_with_their_classification(e2e: E2E) -> None:
    def all_classified() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = e2e.api("/api/articles", limit=50)["items"]
        done = [a for a in items if a["classification"] is not None]
        return items if len(items) == 8 and len(done) == 8 else None

    items = wait_until(all_classified, 120, "5 seeds + 3 feed items classified", e2e.svc)
    seeds = [a for a in items if a["source"] == "seed"]
    from_feed = [a for a in items if a["source"] == "feed"]
    assert len(seeds) == 5 and len(from_feed) == 3
    for a in seeds:  # the five seeds are all about the coalition
        c = a["classification"]
        assert c["relevant"] is True and c["relevance_score"] >= 0.5, a
        assert set(c["topics"]) - {"off_topic"}, a
        assert c["stance"] in ("supportive", "critical", "neutral")
    for a in from_feed:  # football, snow, risotto
        c = a["classification"]
        assert c["relevant"] is False and c["stance"] == "neutral", a
        assert a["outlet"] and a["url"].startswith("https://e2e-news.example/")
    assert {a["language"] for a in from_feed} == {"it", "en"}
    assert {a["id"] for a in e2e.api("/api/articles", relevant="true")["items"]} == {
        a["id"] for a in seeds
    }
    one = e2e.api(f"/api/articles/{from_feed[0]['id']}")
    assert one["text"] and one["classification"]["model_version"].startswith(
        "multilingual-e5-small+"
    )
    [feed] = e2e.api("/api/feeds")["items"]
    assert feed["url"] == e2e.news_url and feed["last_success_at"] and not feed["last_error"]

    m = e2e.metrics()
    assert metric(m, "coalition_watch_entries_ingested_total", source="seed", result="added") == 5
    assert metric(m, "coalition_watch_entries_ingested_total", source="feed", result="added") == 3
    assert metric(m, "coalition_watch_articles_classified_total", relevant="true") == 5
    assert metric(m, "coalition_watch_articles_classified_total", relevant="false") == 3
    assert metric(m, "coalition_watch_feed_polls_total", outcome="ok") >= 1
    assert metric(m, "coalition_watch_articles_pending", stage="classification") == 0
    assert metric(m, "coalition_watch_build_info") == 1


@pytest.mark.slow
def test_writes_need_the_bearer_token(e2e: E2E) -> None:
    attempts = [
        ("POST", "/api/feeds", {"json": {"url": "https://e2e-other.example/feed.xml"}}),
        ("DELETE", "/api/feeds/1", {}),
        ("POST", "/api/silences", {"json": {"rule": "e2e-coalition", "duration": "1h"}}),
        ("DELETE", "/api/silences/1", {}),
    ]
    for method, path, kw in attempts:
        for token in (None, "not-the-token"):
            r = e2e.write(method, path, token=token, **kw)
            assert r.status_code == 401, (method, path, token, r.status_code, r.text)
            assert r.json() == {"error": "missing or wrong bearer token", "path": path}
            assert r.headers["www-authenticate"] == "Bearer"
    # Nothing was written; reads stay open.
    assert [f["url"] for f in e2e.api("/api/feeds")["items"]] == [e2e.news_url]
    assert e2e.api("/api/silences")["items"] == []
    # With the token, writes go through (a silence on another rule, expired at once).
    r = e2e.write("POST", "/api/silences", json={"rule": "us-role-change", "duration": "1h"})
    assert r.status_code == 201, r.text
    expired = e2e.write("DELETE", f"/api/silences/{r.json()['id']}")
    assert expired.status_code == 200 and expired.json()["ends_at"] <= r.json()["ends_at"]


# --- issue 5: a feed change reaches the webhook and the mailbox, once -------------------------


@pytest.mark.slow
def test_a_new_coalition_article_in_a_feed_is_notified_once_by_webhook_and_email(
    e2e: E2E, record_property: Callable[[str, object], None]
) -> None:
    # Nothing on the feed so far is about the coalition; the seeds are not from this feed.
    wait_until(lambda: e2e.feed_articles(1) == (3, 3), 120, "the feed's items classified", e2e.svc)
    time.sleep(1.0)  # a few evaluate/deliver runs
    assert e2e.hook.received == [] and e2e.smtp.messages == []

    changed_wall = datetime.now(UTC)
    e2e.news.publish(COALITION_ITEM)
    changed = time.monotonic()
    wait_until(lambda: e2e.hook.accepted, 60, "the webhook", e2e.svc)
    to_webhook = time.monotonic() - changed
    wait_until(lambda: e2e.smtp.messages, 60, "the email", e2e.svc)
    to_email = time.monotonic() - changed
    time.sleep(3.0)  # several more polls, evaluations and deliveries: still once each

    [hit] = e2e.hook.received
    assert hit.verified and hit.status == 200
    body = hit.json
    assert body["rule"] == "e2e-coalition" and body["severity"] == "warning"
    assert [a["url"] for a in body["articles"]] == [COALITION_ITEM.link]
    assert body["articles"][0]["title"] == COALITION_ITEM.title
    assert "reassurance_force" in [t["name"] for t in body["articles"][0]["topics"]]
    assert hit.headers["webhook-id"] and hit.headers["webhook-signature"].startswith("v1,")
    [mail] = e2e.smtp.messages
    assert isinstance(mail, EmailMessage)
    assert "e2e-coalition" in mail["Subject"] and mail["To"] == "desk@newsroom.example"
    text_part = mail.get_body(preferencelist=("plain",))
    assert text_part is not None and COALITION_ITEM.title in text_part.get_content()
    assert COALITION_ITEM.link in text_part.get_content()

    with e2e.sessions() as s:
        article = s.exec(select(Article).where(Article.url == COALITION_ITEM.link)).one()
        classification = s.exec(
            select(Classification).where(Classification.article_id == article.id)
        ).one()
        [alert] = s.exec(select(Alert)).all()
        deliveries = s.exec(select(Delivery)).all()
    assert alert.article_ids == [article.id] and alert.status == "notified"
    assert sorted((d.target, d.status, d.attempts) for d in deliveries) == [
        ("desk-mail", "sent", 1), ("ops-hook", "sent", 1),
    ]  # fmt: skip
    sent = {d.target: d.sent_at for d in deliveries}
    assert alert.notified_at is not None and sent["ops-hook"] and sent["desk-mail"]

    def after(moment: datetime) -> float:
        return (moment - changed_wall).total_seconds()

    report(
        record_property, "feed_change_to_webhook_seconds", to_webhook,
        f"feed change → webhook received: {to_webhook:.2f} s; → email received: {to_email:.2f} s "
        f"(stored {after(article.fetched_at):.2f} s, classified "
        f"{after(classification.created_at):.2f} s, alert {after(alert.fired_at):.2f} s after "
        "the change; feeds polled every ~1 s, classify every 0.5 s, evaluate and deliver every "
        "0.3 s, group_wait 0s)",
    )  # fmt: skip
    report(
        record_property, "feed_change_to_email_seconds", to_email,
        f"feed change → email received: {to_email:.2f} s",
    )  # fmt: skip
    assert to_webhook < 30 and to_email < 30
    m = e2e.metrics()
    assert metric(m, "coalition_watch_alerts_total", rule="e2e-coalition") == 1
    assert metric(m, "coalition_watch_deliveries_total", kind="webhook", outcome="sent") == 1
    assert metric(m, "coalition_watch_deliveries_total", kind="email", outcome="sent") == 1


# --- issue 6: a large batch, /healthz, SIGTERM and kill -9 ------------------------------------


def add_feed(e2e: E2E, path: str, items: list[Item]) -> int:
    url = e2e.server.document(path, rss(f"E2E bulk {path}", "https://e2e-bulk.example/", items))
    r = e2e.write("POST", "/api/feeds", json={"url": url})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


@pytest.mark.slow
def test_healthz_stays_fast_while_a_large_batch_is_classified(
    e2e: E2E, record_property: Callable[[str, object], None]
) -> None:
    before = e2e.metrics()
    started = time.monotonic()
    feed_id = add_feed(e2e, "/bulk.xml", bulk_items("bulk", BULK))
    wait_until(
        lambda: e2e.feed_articles(feed_id) == (BULK, BULK), 300, f"{BULK} articles classified",
        e2e.svc,
    )  # fmt: skip
    ended = time.monotonic()
    e2e.classify_windows.append((started, ended))
    after = e2e.metrics()

    latencies = e2e.probe.latencies(started, ended)
    report(
        record_property, "healthz_max_seconds_during_classification", max(latencies),
        f"/healthz while {BULK} articles were fetched and classified in {ended - started:.1f} s: "
        f"{summary(latencies)}",
    )  # fmt: skip
    assert e2e.probe.errors_between(started, ended) == []
    assert len(latencies) >= 20, "the probe should have measured throughout"
    assert_fast(latencies)

    # The counters moved with the work.
    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("coalition_watch_entries_ingested_total", source="feed", result="added") == BULK
    assert moved("coalition_watch_articles_classified_total") == BULK
    assert moved("coalition_watch_feed_polls_total", outcome="ok") >= 1
    assert moved("coalition_watch_classification_batch_size_count") >= BULK / 32
    assert moved("coalition_watch_classification_batch_size_sum") == BULK
    assert moved("coalition_watch_stage_last_success_timestamp_seconds", stage="classify") > 0
    assert metric(after, "coalition_watch_articles_pending", stage="classification") == 0


@pytest.mark.slow
def test_sigterm_and_kill_9_during_classification_lose_nothing_and_do_nothing_twice(
    e2e: E2E, record_property: Callable[[str, object], None]
) -> None:
    svc = e2e.svc
    assert svc.proc is not None
    total = 200
    with e2e.sessions() as s:
        stored_before = s.execute(sa.select(sa.func.count(col(Article.id)))).scalar_one()
    notified_before = (len(e2e.hook.received), len(e2e.smtp.messages))
    feed_id = add_feed(e2e, "/bulk2.xml", bulk_items("second", total))

    def classified_some(at_least: int) -> Callable[[], bool]:
        def check() -> bool:
            stored, done = e2e.feed_articles(feed_id)
            return stored == total and at_least <= done < total - 64

        return check

    # SIGTERM in the middle of classification: exit 0 within 10 s, no lease left behind.
    wait_until(classified_some(32), 120, "classification under way", svc)
    signalled = time.monotonic()
    e2e.classify_windows.append((signalled - 1, signalled))
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.proc.wait(timeout=15)
    stop_seconds = time.monotonic() - signalled
    assert code == 0 and stop_seconds < 10, (code, stop_seconds, svc.log_tail())
    with e2e.sessions() as s:
        held = s.exec(select(Article).where(Article.claimed_by == "e2e-run-1")).all()
    # The batch in flight is finished and stored; only one still running after the grace
    # period (a very loaded machine) is left to its lease, and the log says so.
    assert held == [] or LEFT_TO_LEASES in svc.log.read_text(), svc.log_tail()
    stopped_at = e2e.feed_articles(feed_id)[1]
    assert stopped_at < total

    # Restart, then kill -9 while a batch is claimed.
    e2e.restart("e2e-run-2")

    def claiming() -> bool:
        with e2e.sessions() as s:
            mine = s.exec(
                select(Article.id).where(
                    Article.claimed_by == "e2e-run-2", Article.status == ArticleStatus.NEW
                )
            ).all()
        return bool(mine) and e2e.feed_articles(feed_id)[1] > stopped_at

    wait_until(claiming, 120, "the restarted service classifying", svc)
    killed_at = time.monotonic()
    e2e.classify_windows.append((killed_at - 1, killed_at))
    svc.kill()
    with e2e.sessions() as s:
        orphaned = len(s.exec(select(Article.id).where(Article.claimed_by == "e2e-run-2")).all())
    killed_done = e2e.feed_articles(feed_id)[1]
    assert killed_done < total

    # Restart: everything is classified, exactly once.
    restarted = time.monotonic()
    ready = e2e.restart("e2e-run-3")

    def all_done() -> bool:
        return e2e.all_classified(feed_id, total)

    wait_until(all_done, 180, "every article classified after the restart", svc)
    recovered = time.monotonic() - restarted
    e2e.classify_windows.append((ready, time.monotonic()))
    articles, per_article = e2e.classification_counts()
    with e2e.sessions() as s:
        versions = s.execute(sa.select(col(Classification.model_version)).distinct()).all()
    assert articles == stored_before + total  # nothing lost
    assert len(per_article) == articles, "every article has a classification"
    assert set(per_article) == {1}, "and only one"
    assert len(versions) == 1
    # Alerts already sent (the feed change above) were not sent again by the restarts.
    assert (len(e2e.hook.received), len(e2e.smtp.messages)) == notified_before

    report(
        record_property, "restart_recovery_seconds", recovered,
        f"kill -9 with {orphaned} article(s) claimed ({killed_done}/{total} classified) → "
        f"restart → ready in {ready - restarted:.1f} s → all {total} classified, each once, "
        f"{recovered:.1f} s after the restart (the killed process's claims wait for their "
        "10 s lease)",
    )  # fmt: skip
    report(
        record_property, "sigterm_exit_seconds", stop_seconds,
        f"SIGTERM during classification → exit 0 in {stop_seconds:.2f} s "
        f"({stopped_at}/{total} classified, "
        f"{f'{len(held)} claim(s) left to their lease' if held else 'no claim left'})",
    )  # fmt: skip

    # /healthz while the model was loaded and classifying, and over the whole run.
    during = [lat for a, b in e2e.classify_windows for lat in e2e.probe.latencies(a, b)]
    whole = e2e.probe.latencies()
    report(
        record_property, "healthz_max_seconds_whole_run", max(whole),
        f"/healthz during classification: {summary(during)}; over the whole run, three starts "
        f"and model loads included: {summary(whole)}",
    )  # fmt: skip
    assert_fast(during)

    # A clean stop once idle, too.
    stopping = time.monotonic()
    assert svc.stop(timeout=15) == 0
    assert time.monotonic() - stopping < 10
    # Three starts, two stops, a kill: the log tells the story without a single traceback.
    text = svc.log.read_text(errors="replace")
    assert "Traceback" not in text and "ERROR" not in text, svc.log_tail(200)
    assert text.count("coalition-watch running on") == 3
    assert text.count("coalition-watch stopped") + text.count(LEFT_TO_LEASES) == 2


# --- a restart frees the leases a killed process held ----------------------------------------

LONG_LEASE = 600  # the default classifier.lease_seconds


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.slow
def test_a_restart_takes_over_at_once_the_work_a_kill_9_left_under_long_leases(
    e2e: E2E, record_property: Callable[[str, object], None]
) -> None:
    """The default instance name (host:pid) and 10-minute leases, as in production: after
    ``kill -9`` the restarted service frees the dead process's leases when it starts, and
    classifies its batch within a fraction of the lease, each article once."""
    svc = e2e.svc
    if svc.proc is not None and svc.proc.poll() is None:
        assert svc.stop(timeout=15) == 0
    svc.env.pop("COALITION_WATCH_INSTANCE_ID", None)
    svc.env["COALITION_WATCH_CLASSIFIER__LEASE_SECONDS"] = str(LONG_LEASE)
    log_start = svc.log.stat().st_size if svc.log.exists() else 0
    total = 160
    svc.start()
    e2e.wait_ready()
    assert svc.proc is not None
    victim = f"{socket.gethostname()}:{svc.proc.pid}"  # its instance_id: Popen runs python itself
    feed_id = add_feed(e2e, "/bulk3.xml", bulk_items("third", total))

    def holding_a_batch() -> bool:
        with e2e.sessions() as s:
            mine = s.exec(
                select(Article.id).where(
                    Article.feed_id == feed_id,
                    Article.claimed_by == victim,
                    Article.status == ArticleStatus.NEW,
                )
            ).all()
        return bool(mine)

    wait_until(holding_a_batch, 120, "the service classifying under its host:pid name", svc)
    svc.kill()
    with e2e.sessions() as s:
        held = s.exec(select(Article).where(Article.claimed_by == victim)).all()
    done_at_kill = e2e.feed_articles(feed_id)[1]
    assert held and done_at_kill < total
    # The leases really are long: without the release at start they would hold for minutes.
    assert all(a.claimed_until is not None for a in held)
    assert min(a.claimed_until for a in held if a.claimed_until) > datetime.now(UTC) + timedelta(
        seconds=LONG_LEASE - 120
    )

    restarted = time.monotonic()
    svc.start()  # the same settings: another pid, so another name
    e2e.wait_ready()
    ready = time.monotonic()

    def all_done() -> bool:
        return e2e.all_classified(feed_id, total)

    bound = LONG_LEASE / 3  # well under the lease: only the release can explain it
    wait_until(all_done, bound, "the dead process's batch classified after the restart", svc)
    recovered = time.monotonic() - restarted
    articles, per_article = e2e.classification_counts()
    with e2e.sessions() as s:
        still_held = s.exec(select(Article.id).where(Article.claimed_by == victim)).all()
    assert len(per_article) == articles and set(per_article) == {1}
    assert still_held == []

    text = svc.log.read_text(errors="replace")[log_start:]
    released = [line for line in text.splitlines() if "left by dead process " + victim in line]
    assert len(released) == 1, svc.log_tail(100)
    count = int(released[0].split("released ", 1)[1].split(" ", 1)[0])
    assert count >= len(held), released  # the articles, and any feed, alert or delivery lease
    report(
        record_property, "restart_recovery_seconds_long_lease", recovered,
        f"kill -9 holding {len(held)} article lease(s) of {LONG_LEASE} s ({done_at_kill}/{total} "
        f"classified) → restart → ready in {ready - restarted:.1f} s, {count} lease(s) freed at "
        f"start → all {total} classified, each once, {recovered:.1f} s after the restart",
    )  # fmt: skip
    assert svc.stop(timeout=15) == 0
    assert "Traceback" not in text and "ERROR" not in text, svc.log_tail(200)


def test_collect_once_frees_a_feed_left_by_a_dead_process_on_this_host(tmp_path: Path) -> None:
    server = FeedServer().start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
        env.update(
            COALITION_WATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'collect.db'}",
            PYTHONPATH=str(REPO),
        )
        svc = Service(tmp_path, env, free_port())
        svc.cli("db", "upgrade")
        urls = [
            server.document(f"/{name}.xml", rss(name, "https://e2e-news.example/", OFF_TOPIC))
            for name in ("orphaned", "busy")
        ]
        for url in urls:
            svc.cli("feeds", "add", url)
        host = socket.gethostname()
        dead, alive = f"{host}:{_dead_pid()}", f"{host}:{os.getpid()}"
        engine = make_engine(env["COALITION_WATCH_DATABASE_URL"])
        until = datetime.now(UTC) + timedelta(minutes=10)
        with engine.begin() as conn:
            for url, owner in zip(urls, (dead, alive), strict=True):
                conn.execute(
                    sa.update(Feed).where(col(Feed.url) == url).values(
                        claimed_by=owner, claimed_until=until, next_check_at=None
                    )
                )  # fmt: skip
        out = svc.cli("collect", "--once")
        assert "polled 1 feeds: 1 ok" in out.stdout, out
        assert f"released 1 leases left by dead process {dead}" in out.stderr, out.stderr
        with engine.connect() as conn:
            leases = dict(conn.execute(sa.select(col(Feed.url), col(Feed.claimed_by))).all())
        engine.dispose()
        assert leases == {urls[0]: None, urls[1]: alive}  # the live process's feed is untouched
    finally:
        server.stop()


# --- a newcomer's first minutes ---------------------------------------------------------------


def test_every_command_has_a_help_text() -> None:
    from typer.main import get_command
    from typer.testing import CliRunner

    from service.cli import app

    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():  # a group's commands
            yield from walk(sub, [*path, name])

    runner = CliRunner()
    seen = []
    for path, command in walk(get_command(app), []):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        # The first paragraph is the summary in the command list: one line, or typer breaks it.
        first = (command.help or "").strip().split("\n\n")[0]
        assert first and "\n" not in first, (path, first)
        seen.append(" ".join(path))
    assert {"run", "db upgrade", "feeds add", "alerts check", "model build"} <= set(seen)


def test_run_on_a_busy_port_and_ingest_without_seeds_say_what_to_do(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    env.update(
        COALITION_WATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'busy.db'}", PYTHONPATH=str(REPO)
    )
    svc = Service(tmp_path, env, free_port())
    svc.cli("db", "upgrade")
    missing = svc.cli("ingest", "seeds", check=False)  # tmp_path has no seeds/ folder
    assert missing.returncode == 1
    assert f"no seed folder at {tmp_path / 'seeds'}" in missing.stderr
    assert "COALITION_WATCH_SEEDS_DIR" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc.env["COALITION_WATCH_HTTP__PORT"] = str(port)
        busy = svc.cli("run", check=False)
    assert busy.returncode == 2, busy.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "COALITION_WATCH_HTTP__PORT" in busy.stderr and "Traceback" not in busy.stderr


def test_readyz_names_a_model_that_cannot_load(db_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from processors.classifier import ClassifierOptions
    from service.config import Settings
    from service.context import build_context
    from service.http import Readiness, create_app
    from service.jobs import ClassifyJobs

    ctx = build_context(Settings(database_url=db_url))
    readiness = Readiness(scheduler_running=True)
    missing = tmp_path / "no-encoder-here"
    jobs = ClassifyJobs(ClassifierOptions(encoder=str(missing)), checks=readiness.checks)
    client = TestClient(create_app(ctx, readiness))
    try:
        assert client.get("/readyz").json()["reasons"] == ["model: loading"]
        with pytest.raises(Exception, match="no-encoder-here"):
            jobs.classifier()  # what the service's start-up load and classify job call
        r = client.get("/readyz")
        assert r.status_code == 503
        [reason] = r.json()["reasons"]
        assert reason.startswith("model: failed to load (") and "no-encoder-here" in reason
    finally:
        ctx.close()
