"""Alert test helpers: stored articles, an injected clock, a real webhook receiver (HTTP on
127.0.0.1 that checks Standard Webhooks signatures on its own) and a real SMTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

from alerts.evaluate import EvaluationResult, evaluate_batch
from alerts.notifiers import NotifierDeps, TargetOptions, build_notifier, parse_target
from alerts.outbox import DeliverResult, FlushResult, RetryPolicy, deliver_due, flush_due_alerts
from alerts.rules import RuleSet, parse_rules
from storage.db import SessionFactory, transaction
from storage.models import Article, ArticleStatus, Classification, Story
from tests.conftest import free_port

SECRET = "whsec_" + base64.b64encode(b"coalition-watch test secret, 32b").decode()


class Clock:
    """An injected clock: tests move time instead of sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """CLI commands install a handler on the runner's stream; put the test's back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def add_story(sessions: SessionFactory, title: str, *, sources: int = 1, count: int = 1) -> int:
    with transaction(sessions) as s:
        story = Story(title=title, article_count=count, source_count=sources)
        s.add(story)
        s.flush()
        assert story.id is not None
        return story.id


_seq = iter(range(1, 10**9))


def add_article(
    sessions: SessionFactory,
    *,
    title: str = "Coalition leaders agree on the reassurance force",
    text: str = (
        "Paris, 6 January.\n\nThe coalition of the willing agreed today to deploy a "
        "multinational reassurance force in Ukraine once a ceasefire holds, with security "
        "guarantees backed by the United States.\n\nMarkets were calm."
    ),
    story_id: int | None = None,
    outlet: str = "Test Wire",
    language: str = "en",
    relevant: bool = True,
    relevance_score: float = 0.97,
    topics: dict[str, float] | None = None,
    stance: str = "supportive",
    stance_score: float = 0.8,
    fetched_at: datetime | None = None,
    classified: bool = True,
    url: str | None = None,
) -> int:
    topics = {"reassurance_force": 0.93, "security_guarantees": 0.81} if topics is None else topics
    n = next(_seq)
    with transaction(sessions) as s:
        article = Article(
            uid=f"test:{n}:{time.monotonic_ns()}", source="feed", guid=f"g{n}",
            url=url or f"https://news.example/{n}", outlet=outlet, title=title, text=text,
            language=language, published_at=fetched_at or datetime.now(UTC),
            fetched_at=fetched_at or datetime.now(UTC), content_hash=f"h{n}", story_id=story_id,
            status=ArticleStatus.CLASSIFIED if classified else ArticleStatus.NEW,
        )  # fmt: skip
        s.add(article)
        s.flush()
        assert article.id is not None
        if classified:
            s.add(
                Classification(
                    article_id=article.id, model_version="test", relevant=relevant,
                    relevance_score=relevance_score, topics=list(topics), topic_scores=topics,
                    stance=stance, stance_score=stance_score,
                    stance_scores={stance: stance_score},
                )
            )  # fmt: skip
        return article.id


def webhook_target(name: str, url: str, **extra: Any) -> TargetOptions:
    return parse_target({"name": name, "kind": "webhook", "url": url, "secret": SECRET, **extra}, 0)


def email_target(name: str, port: int, **extra: Any) -> TargetOptions:
    raw = {
        "name": name, "kind": "email", "host": "127.0.0.1", "port": port, "security": "none",
        "from": "Coalition Watch <alerts@cw.example>", "to": ["desk@newsroom.example"],
        "timeout": "5s", **extra,
    }  # fmt: skip
    return parse_target(raw, 0)


def targets_toml(webhook_url: str, smtp_port: int, hook: str = "hook", desk: str = "desk") -> str:
    """The TOML of one webhook target (signed with SECRET) and one email target, for configs
    handed to a real ``coalition-watch`` process."""
    return f"""
[[alerts.targets]]
name = "{hook}"
kind = "webhook"
url = "{webhook_url}"
secret = "{SECRET}"
timeout = "5s"

[[alerts.targets]]
name = "{desk}"
kind = "email"
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "Coalition Watch <alerts@cw.example>"
to = ["desk@newsroom.example"]
timeout = "5s"
"""


RULES = """
rules:
  - name: coalition
    description: The coalition's reassurance force.
    match:
      relevant: true
      topics_any: [reassurance_force, security_guarantees]
      min_confidence: 0.5
    group_by: [story]
    group_wait: 2m
    repeat_interval: 6h
    severity: warning
"""


@dataclass
class Pipeline:
    """The real stages, run by hand with an injected clock: evaluate → flush → deliver."""

    sessions: SessionFactory
    clock: Clock
    targets: list[TargetOptions]
    rules_text: str = RULES
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    owner: str = "test-worker"
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def rules(self) -> RuleSet:
        return parse_rules(self.rules_text, "test-rules", [t.name for t in self.targets])

    def evaluate(self) -> EvaluationResult:
        return evaluate_batch(self.sessions, self.rules, owner=self.owner, now=self.clock())

    def flush(self) -> FlushResult:
        return flush_due_alerts(
            self.sessions, self.rules, self.targets, self.policy, owner=self.owner,
            now=self.clock(),
        )  # fmt: skip

    async def deliver(self) -> DeliverResult:
        async with httpx.AsyncClient() as http:
            deps = NotifierDeps(http=http, clock=self.clock)
            notifiers = {t.name: build_notifier(t, deps) for t in self.targets}
            return await deliver_due(
                self.sessions, self.rules, notifiers, self.policy, owner=self.owner,
                clock=self.clock, rng=self.rng,
            )  # fmt: skip


# --- a real webhook receiver ----------------------------------------------------------------


def receiver_verifies(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's own check, written from the Standard Webhooks spec (not our signer)."""
    key = (
        base64.b64decode(secret.removeprefix("whsec_"))
        if secret.startswith("whsec_")
        else secret.encode()
    )
    try:
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    except KeyError:
        return False
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split() if "," in s]
    return any(hmac.compare_digest(expected, s) for s in offered)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that verifies signatures and answers from a script.

    ``script`` items: a status code, ``(status, headers)``, or ``("sleep", seconds)`` to stall
    before answering 200. Requests with a bad signature are answered 401.
    """

    def __init__(self, secret: str = SECRET, script: list[Any] | None = None) -> None:
        self.secret = secret
        self.script = list(script or [])
        self.received: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = receiver_verifies(receiver.secret, headers, body)
                status, extra = 200, {}
                with receiver.lock:
                    step = receiver.script.pop(0) if ok and receiver.script else None
                if not ok:
                    status = 401
                elif isinstance(step, tuple) and step[0] == "sleep":
                    time.sleep(step[1])
                elif isinstance(step, tuple):
                    status, extra = step
                elif isinstance(step, int):
                    status = step
                with receiver.lock:
                    receiver.received.append(Received(headers, body, ok, status))
                payload = b"bad signature" if status == 401 else b"ok"
                self.send_response(status)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.verified and 200 <= r.status < 300]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.close()


# --- a real SMTP server ---------------------------------------------------------------------


class MailSink:
    """aiosmtpd handler: keeps every message; ``reject`` answers DATA with that reply."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.reject: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reject:
            return self.reject
        msg = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        return "250 OK"


class SmtpServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.sink = MailSink()
        self.controller: Controller | None = None

    def start(self) -> None:
        self.controller = Controller(self.sink, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    @property
    def messages(self) -> list[EmailMessage]:
        return self.sink.messages


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
