"""Shared parts of the reliability suite (replicas, fault injection): real servers, real processes.

- :class:`FeedFarm` (fixture ``feed_farm``): a real HTTP server on 127.0.0.1 (random port, in a
  thread) serving generated RSS feeds of short, realistic English and Italian items about the
  coalition (plus some off-topic ones), deterministic from the feed and entry numbers. It
  counts every request per path, so a test counts polls *on the server's side*. Any other
  path can be scripted with :meth:`FeedFarm.route` (a ``tests.collectors.feedserver.Reply``:
  status, headers, body, a streamed body, a delay), which is how hostile feeds are served.
- :class:`WebhookReceiver` (fixture ``webhook_receiver``): a real HTTP server on 127.0.0.1 that
  verifies Standard Webhooks signatures with its own code (written from the spec, not ours)
  and records every request's ``webhook-id``. It can be taken down (connection refused, the
  port kept for later), answer errors (e.g. 503) for a while, then come back up.
- :class:`Replicas`: N real ``coalition-watch run`` subprocesses (``sys.executable -m
  service.cli run``) on one database, each with its own port, ``instance_id``, working folder
  and log, all with short job intervals and leases (:data:`FAST_ENV`), a TOML config with the
  receiver as a webhook target, and a rules file. Always use it as a context manager (or call
  :meth:`Replicas.kill_all` in ``finally``): every subprocess is killed at the end.
- :func:`wait_until`: the one bounded wait used everywhere.

PostgreSQL comes from the root conftest (``pg_url``: a fresh database per test; unreachable
PostgreSQL is a skip, a failure under ``CI=true``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.collectors.feedserver import FeedServer, Handler, Reply, conditional
from tests.conftest import REPO, SEEDS, ServiceProcess, free_port

SECRET = "whsec_" + base64.b64encode(b"reliability-suite webhook secret").decode()


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        time.sleep(interval)


# --- generated feed content ---------------------------------------------------------------

# (language, title, text) templates of coalition news; {outlet}, {city}, {leader}, {n}, {hh}
# and {mm} are filled per entry so every item's text is unique.
_EVENTS: list[tuple[str, str, str]] = [
    (
        "en",
        "Coalition of the willing agrees on a reassurance force for Ukraine",
        "{city}, {hh}:{mm}. Leaders of the coalition of the willing agreed to deploy a "
        "multinational reassurance force in Ukraine once a ceasefire holds, {outlet} reports. "
        "{leader} said {n} countries have offered troops, air policing or naval support.",
    ),
    (
        "it",
        "Volenterosi, intesa sulla forza di rassicurazione in Ucraina",
        "{city}, ore {hh}:{mm}. I leader della coalizione dei volenterosi hanno concordato "
        "l'invio di una forza multinazionale di rassicurazione in Ucraina dopo il cessate il "
        "fuoco, riferisce {outlet}. {leader}: {n} Paesi pronti a contribuire con truppe.",
    ),
    (
        "en",
        "Security guarantees for Kyiv take shape as allies sign pledges",
        "{city}, {hh}:{mm}. European allies signed pledges of long-term security guarantees "
        "for Ukraine, {outlet} reports, with {n} governments committing to training, weapons "
        "and a rapid consultation mechanism if Russia attacks again. {leader} welcomed the deal.",
    ),
    (
        "it",
        "Garanzie di sicurezza per Kiev, firmati gli impegni degli alleati",
        "{city}, ore {hh}:{mm}. Gli alleati europei hanno firmato impegni di garanzie di "
        "sicurezza a lungo termine per l'Ucraina, scrive {outlet}: {n} governi promettono "
        "addestramento, armi e consultazioni rapide in caso di nuovo attacco russo.",
    ),
    (
        "en",
        "Kremlin rejects any European troops in Ukraine",
        "{city}, {hh}:{mm}. The Kremlin said any deployment of European troops in Ukraine "
        "would be a legitimate target, {outlet} reports. Peskov called the coalition's plan a "
        "provocation after {n} countries discussed the reassurance force.",
    ),
    (
        "it",
        "Il Cremlino respinge l'invio di truppe europee in Ucraina",
        "{city}, ore {hh}:{mm}. Mosca considera qualsiasi contingente europeo in Ucraina un "
        "obiettivo legittimo, riferisce {outlet}. Per il portavoce Peskov il piano dei "
        "volenterosi, discusso da {n} Paesi, e' una provocazione.",
    ),
    (
        "en",
        "United States weighs a backstop for the European force",
        "{city}, {hh}:{mm}. Washington is considering air and intelligence support as a "
        "backstop for a European reassurance force in Ukraine, {outlet} reports. {leader} "
        "discussed the US role with {n} allied governments.",
    ),
    (
        "it",
        "Stati Uniti, ipotesi di sostegno alla forza europea",
        "{city}, ore {hh}:{mm}. Washington valuta supporto aereo e di intelligence alla forza "
        "europea di rassicurazione in Ucraina, scrive {outlet}. {leader} ne ha parlato con "
        "{n} governi alleati.",
    ),
    (
        "en",
        "Ceasefire talks resume with a new draft on monitoring",
        "{city}, {hh}:{mm}. Negotiators resumed ceasefire talks on Ukraine with a new draft on "
        "monitoring the contact line, {outlet} reports. {leader} said {n} points remain open.",
    ),
    (
        "it",
        "Riprendono i negoziati per il cessate il fuoco in Ucraina",
        "{city}, ore {hh}:{mm}. Sono ripresi i negoziati sul cessate il fuoco in Ucraina con "
        "una nuova bozza sul monitoraggio della linea di contatto, riferisce {outlet}. "
        "{leader}: restano aperti {n} punti.",
    ),
]

_OFF_TOPIC: list[tuple[str, str, str]] = [
    (
        "en",
        "Local council approves new cycling lanes",
        "{city}, {hh}:{mm}. The city council approved {n} kilometres of new cycling lanes, "
        "{outlet} reports. Works start in spring and the budget was agreed unanimously.",
    ),
    (
        "it",
        "Serie A, pareggio nel posticipo della giornata",
        "{city}, ore {hh}:{mm}. Finisce in pareggio il posticipo di Serie A, riferisce {outlet}. "
        "Gli allenatori hanno commentato le {n} occasioni da gol della partita.",
    ),
    (
        "en",
        "Weather: heavy rain expected over the weekend",
        "{city}, {hh}:{mm}. Forecasters expect heavy rain and {n} millimetres of water over the "
        "weekend, {outlet} reports. Authorities advised drivers to take care.",
    ),
    (
        "it",
        "Mostra sul Rinascimento, record di visitatori",
        "{city}, ore {hh}:{mm}. La mostra sul Rinascimento ha superato {n} mila visitatori, "
        "scrive {outlet}. L'esposizione resta aperta fino a marzo.",
    ),
]

_CITIES = ["Paris", "Roma", "London", "Berlin", "Kyiv", "Bruxelles", "Warsaw", "Madrid"]
_LEADERS = ["Macron", "Meloni", "Starmer", "Merz", "Zelensky", "Tusk", "Rutte", "Costa"]


@dataclass(frozen=True)
class FarmEntry:
    guid: str
    link: str
    title: str
    text: str
    language: str
    published: datetime
    key: str  # equal keys: the same item (one article after dedup)


def _fill(template: tuple[str, str, str], outlet: str, f: int, j: int) -> tuple[str, str, str]:
    language, title, text = template
    values = {
        "outlet": outlet, "city": _CITIES[(f + j) % len(_CITIES)],
        "leader": _LEADERS[(f * 3 + j) % len(_LEADERS)], "n": 3 + (f * 7 + j) % 29,
        "hh": f"{(f + 2 * j) % 24:02d}", "mm": f"{(f * 11 + j) % 60:02d}",
    }  # fmt: skip
    return language, title, text.format(**values)


def _of(pool: list[tuple[str, str, str]], language: str) -> list[tuple[str, str, str]]:
    return [t for t in pool if t[0] == language]


def feed_language(f: int) -> str:
    """Even feeds are English, odd ones Italian (each feed declares its language)."""
    return "it" if f % 2 else "en"


def farm_entry(f: int, j: int, now: datetime) -> FarmEntry:
    """Entry ``j`` of feed ``f``, in the feed's language: coalition news, every fifth entry off
    topic. Entry 18 is a wire story carried by every 40th feed under one link; entry 19 a story
    copied by every 30th feed under its own link (same text). Each is one article after
    cross-feed dedup (by canonical URL, by content hash)."""
    language = feed_language(f)
    events = _of(_EVENTS, language)
    published = now - timedelta(minutes=5 + 20 * j + (f % 13))
    outlet = f"Gazzetta {f:03d}"
    host = f"https://news{f:03d}.example.org"
    if j == 18:
        w = f % 40
        _, title, text = _fill(events[w % len(events)], f"Agenzia Wire {w}", w, 0)
        link = f"https://wire.example.org/story/{w}"
        return FarmEntry(f"{host}/g/{j}", link, title, text, language, published, f"wire:{w}")
    if j == 19:
        w = f % 30
        _, title, text = _fill(events[(w + 3) % len(events)], f"Copia Wire {w}", w, 1)
        link = f"{host}/copy/{w}"
        return FarmEntry(f"{host}/g/{j}", link, title, text, language, published, f"copy:{w}")
    pool = _of(_OFF_TOPIC, language) if j % 5 == 4 else events
    _, title, text = _fill(pool[(f + j) % len(pool)], outlet, f, j)
    link = f"{host}/{f}/{j}.html"
    return FarmEntry(f"{host}/g/{j}", link, title, text, language, published, f"{f}:{j}")


def rss_document(title: str, site: str, language: str, entries: list[FarmEntry]) -> bytes:
    items = "".join(
        "<item>"
        f"<title>{escape(e.title)}</title><link>{escape(e.link)}</link>"
        f'<guid isPermaLink="false">{escape(e.guid)}</guid>'
        f"<pubDate>{format_datetime(e.published)}</pubDate>"
        f"<description>{escape(e.text)}</description>"
        "</item>"
        for e in entries
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<rss version="2.0"><channel>'
        f"<title>{escape(title)}</title><link>{escape(site)}</link>"
        f"<language>{language}</language><description>{escape(title)}</description>"
        f"{items}</channel></rss>"
    ).encode()


class FeedFarm:
    """Many generated feeds on one real HTTP server; requests are counted per path.

    ``generate(n, entries)`` publishes feeds ``/feeds/000.xml`` … and returns their URLs;
    ``expected_articles`` is how many distinct articles they hold after dedup. ``route``
    serves anything else (hostile documents): see ``tests.collectors.feedserver.Reply``.
    """

    def __init__(self) -> None:
        self.server = FeedServer().start()
        self.entries: dict[str, list[FarmEntry]] = {}  # path -> its entries

    @property
    def base(self) -> str:
        return self.server.url("")

    def url(self, path: str) -> str:
        return self.server.url(path)

    def route(self, path: str, handler: Handler) -> str:
        return self.server.route(path, handler)

    def reply(self, path: str, reply: Reply) -> str:
        """Serve a fixed :class:`Reply` at ``path``."""
        return self.route(path, lambda _request: reply)

    def generate(self, feeds: int, entries: int = 20, now: datetime | None = None) -> list[str]:
        now = now or datetime.now(UTC).replace(microsecond=0)
        urls = []
        for f in range(feeds):
            items = [farm_entry(f, j, now) for j in range(entries)]
            body = rss_document(
                f"Gazzetta {f:03d}", f"https://news{f:03d}.example.org/", feed_language(f), items
            )
            path = f"/feeds/{f:03d}.xml"
            self.entries[path] = items
            urls.append(self.route(path, conditional(body, "application/rss+xml; charset=utf-8")))
        return urls

    @property
    def expected_articles(self) -> int:
        return len({e.key for items in self.entries.values() for e in items})

    def fetch_counts(self, prefix: str = "/feeds/") -> Counter[str]:
        """Requests answered so far, per path (query strings dropped)."""
        with self.server.lock:
            return Counter(
                r.path.split("?", 1)[0] for r in self.server.requests if r.path.startswith(prefix)
            )

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def feed_farm() -> Iterator[FeedFarm]:
    farm = FeedFarm()
    yield farm
    farm.close()


# --- webhook receiver ---------------------------------------------------------------------


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks v1 check, written from the spec: HMAC-SHA256 over id.timestamp.body."""
    key = base64.b64decode(secret[6:]) if secret.startswith("whsec_") else secret.encode()
    try:
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        if abs(time.time() - int(headers["webhook-timestamp"])) > 300:
            return False
    except (KeyError, ValueError):
        return False
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if "," in s]
    return any(hmac.compare_digest(expected, s) for s in offered)


@dataclass(frozen=True)
class Hook:
    webhook_id: str
    verified: bool
    status: int
    body: bytes
    at: float


class WebhookReceiver:
    """A real webhook endpoint on 127.0.0.1: verifies signatures, records webhook-ids.

    States: ``up()`` (2xx), ``fail(status)`` (answers that status, e.g. 503, to every valid
    request, which is recorded with it), ``down()`` (the listening socket is closed: connection
    refused; ``up()`` listens again on the same port). A request with a bad signature is
    answered 401 and recorded with ``verified=False``. ``delay`` stalls every answer.
    """

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.hooks: list[Hook] = []
        self.lock = threading.Lock()
        self.status = 200
        self.delay = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.up()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = verify_signature(receiver.secret, headers, body)
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.status if ok else 401
                with receiver.lock:
                    receiver.hooks.append(
                        Hook(headers.get("webhook-id", ""), ok, status, body, time.time())
                    )
                payload = b"ok" if status < 300 else b"refused"
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_args: Any) -> None:
                return

        return _Handler

    def up(self) -> None:
        """Listen (again, on the same port) and answer 2xx."""
        self.status = 200
        if self._server is not None:
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: senders get connection refused."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def fail(self, status: int = 503) -> None:
        """Keep listening but answer ``status`` to every valid request."""
        self.up()
        self.status = status

    def accepted_ids(self) -> Counter[str]:
        """webhook-id -> how many times it was accepted (verified and answered 2xx)."""
        with self.lock:
            return Counter(h.webhook_id for h in self.hooks if h.verified and h.status < 300)

    def duplicates(self) -> dict[str, int]:
        return {k: n for k, n in self.accepted_ids().items() if n > 1}

    def unverified(self) -> list[Hook]:
        with self.lock:
            return [h for h in self.hooks if not h.verified]

    def close(self) -> None:
        self.down()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


# --- replicas -----------------------------------------------------------------------------

RULES_ZERO_WAIT = """
rules:
  - name: coalition-news
    description: Any relevant coalition story (first article of the story).
    match:
      relevant: true
      new_story: true
    group_by: [story]
    group_wait: 0s
    repeat_interval: 6h
    severity: warning
  - name: russian-response
    description: Moscow answers the coalition.
    match:
      relevant: true
      topics_any: [russia_position]
      keywords_any: [Kremlin, Cremlino, Mosca, Moscow, Peskov]
    group_by: [story]
    group_wait: 0s
    repeat_interval: 6h
    severity: info
  - name: off-topic-audit
    description: Every article judged not relevant, one notification each (no story).
    match:
      relevant: false
    group_by: [story]
    group_wait: 0s
    repeat_interval: 6h
    severity: info
"""

# Short intervals and leases: a whole pipeline in seconds, and a killed replica's work
# taken over within ~20 s. Feeds are polled once: their interval (1 h) outlasts any test.
FAST_ENV: dict[str, str] = {
    "COALITION_WATCH_FEEDS__JOB_INTERVAL": "2",
    "COALITION_WATCH_FEEDS__CLAIM_BATCH": "10",
    "COALITION_WATCH_FEEDS__TOTAL_TIMEOUT": "8",
    "COALITION_WATCH_FEEDS__CONNECT_TIMEOUT": "3",
    "COALITION_WATCH_FEEDS__LEASE_SECONDS": "120",
    "COALITION_WATCH_FEEDS__MIN_INTERVAL": "3600",
    "COALITION_WATCH_FEEDS__DEFAULT_INTERVAL": "3600",
    "COALITION_WATCH_FEEDS__BACKOFF_BASE": "2",
    "COALITION_WATCH_FEEDS__BACKOFF_CAP": "10",
    "COALITION_WATCH_CLASSIFIER__INTERVAL": "2",
    "COALITION_WATCH_CLASSIFIER__LEASE_SECONDS": "30",
    "COALITION_WATCH_CLASSIFIER__CLAIM_BATCH": "16",
    "COALITION_WATCH_CLASSIFIER__THREADS": "1",
    "COALITION_WATCH_CLASSIFIER__PRECISION": "float32",
    "COALITION_WATCH_ALERTS__EVALUATE_INTERVAL": "1",
    "COALITION_WATCH_ALERTS__DELIVER_INTERVAL": "1",
    "COALITION_WATCH_ALERTS__LEASE": "10s",
    "COALITION_WATCH_ALERTS__RETRY__INITIAL": "1s",
    "COALITION_WATCH_ALERTS__RETRY__MAX": "4s",
    "COALITION_WATCH_SCHEDULER__MISFIRE_GRACE_TIME": "30",
}


def webhook_target_toml(name: str, url: str, secret: str = SECRET, timeout: str = "3s") -> str:
    return (
        f'[[alerts.targets]]\nname = "{name}"\nkind = "webhook"\nurl = "{url}"\n'
        f'secret = "{secret}"\ntimeout = "{timeout}"\n'
    )


def email_target_toml(name: str, port: int, timeout: str = "3s") -> str:
    return (
        f'[[alerts.targets]]\nname = "{name}"\nkind = "email"\nhost = "127.0.0.1"\n'
        f'port = {port}\nsecurity = "none"\nfrom = "Coalition Watch <alerts@cw.example>"\n'
        f'to = ["desk@newsroom.example"]\ntimeout = "{timeout}"\n'
    )


@dataclass
class Replica:
    """One ``coalition-watch run`` subprocess (see :class:`tests.conftest.ServiceProcess`)."""

    name: str
    process: ServiceProcess

    @property
    def log_text(self) -> str:
        path = self.process.log
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def alive(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.poll() is None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``: (name, sorted labels) -> value."""
        text = httpx.get(self.process.base + "/metrics", timeout=5).text
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= set(ls))


@dataclass
class Replicas:
    """N ``coalition-watch run`` processes on one database (``with Replicas(...) as r:``).

    Each replica gets port, instance_id ``replica-<i>``, ``PGAPPNAME=replica-<i>`` (so the
    database sees which one wrote), its own folder and ``service.log`` under ``workdir``. The
    shared config (``config.toml``) holds ``config_toml`` (targets); ``rules`` is written to
    ``rules.yaml`` and used as ``alerts.rules``; ``env`` adds to / overrides :data:`FAST_ENV`.
    The database is migrated by :meth:`start` (``db upgrade`` once).
    """

    workdir: Path
    database_url: str
    count: int = 3
    config_toml: str = ""
    rules: str = RULES_ZERO_WAIT
    env: dict[str, str] = field(default_factory=dict)
    seeds_dir: Path | None = None
    replicas: list[Replica] = field(default_factory=list)

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill_all()

    def _env(self, i: int, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
        config = self.workdir / "config.toml"
        env.update(FAST_ENV)
        env.update(
            COALITION_WATCH_DATABASE_URL=self.database_url,
            COALITION_WATCH_CONFIG=str(config),
            COALITION_WATCH_ALERTS__RULES=str(self.workdir / "rules.yaml"),
            COALITION_WATCH_HTTP__PORT=str(port),
            COALITION_WATCH_INSTANCE_ID=f"replica-{i}",
            COALITION_WATCH_SEEDS_DIR=str(self.seeds_dir or self.workdir / "no-seeds"),
            COALITION_WATCH_DATA_DIR=str(self.workdir / f"replica-{i}" / "data"),
            PGAPPNAME=f"replica-{i}",
            PYTHONPATH=str(REPO),
        )
        env.update(self.env)
        return env

    def start(self, ready_timeout: float = 180) -> None:
        """Migrate, start every replica, wait until each answers ``/readyz``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.toml").write_text(self.config_toml)
        (self.workdir / "rules.yaml").write_text(self.rules)
        (self.workdir / "no-seeds").mkdir(exist_ok=True)
        for i in range(self.count):
            folder = self.workdir / f"replica-{i}"
            folder.mkdir(exist_ok=True)
            port = free_port()
            self.replicas.append(
                Replica(f"replica-{i}", ServiceProcess(folder, self._env(i, port), port))
            )
        first = self.replicas[0].process
        done = first.cli("db", "upgrade", check=False)
        assert done.returncode == 0, f"db upgrade failed:\n{done.stdout}\n{done.stderr}"
        for r in self.replicas:
            r.process.start()
        for r in self.replicas:
            r.process.wait_http("/readyz", timeout=ready_timeout)

    def __getitem__(self, i: int) -> Replica:
        return self.replicas[i]

    def kill(self, i: int) -> None:
        """SIGKILL replica ``i`` (no chance to release its leases) and reap it."""
        self.replicas[i].process.kill()

    def kill_all(self) -> None:
        for r in self.replicas:
            with contextlib.suppress(Exception):  # keep killing the others
                r.process.kill()

    def stop_all(self, timeout: float = 20) -> list[int]:
        """SIGTERM every live replica; their exit codes."""
        codes = []
        for r in self.replicas:
            if r.alive:
                codes.append(r.process.stop(timeout=timeout))
        return codes

    def logs(self) -> str:
        return "\n".join(f"===== {r.name} =====\n{r.log_text[-6000:]}" for r in self.replicas)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


__all__ = [
    "FAST_ENV", "RULES_ZERO_WAIT", "SECRET", "SEEDS", "FarmEntry", "FeedFarm", "Hook", "Replica",
    "Replicas", "Reply", "WebhookReceiver", "email_target_toml", "farm_entry", "port_open",
    "rss_document", "verify_signature", "wait_until", "webhook_target_toml",
]  # fmt: skip
