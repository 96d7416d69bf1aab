"""Scale-out: three ``coalition-watch run`` replicas on one PostgreSQL database, no double work.

Everything is counted on the servers' side:

- the feed farm counts requests per feed (each of the 200 feeds fetched exactly once);
- PostgreSQL counts writes: audit triggers installed by the test record every insert or
  update of a ``classification`` row, every delivery that becomes ``sent`` and every stored
  article, with the ``application_name`` of the writing replica (``PGAPPNAME``), so an article
  classified twice or a delivery marked sent twice shows up whoever did it;
- the webhook receiver verifies Standard Webhooks signatures and counts ``webhook-id``s;
- the replicas' own ``/metrics`` agree with the audit.

The second test SIGKILLs a replica while it holds classification leases: its leases expire
and the others take its work over, still with nothing lost and nothing doubled.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from collectors.feeds import FeedOptions, add_feed, store_entries
from collectors.parse import ParsedEntry
from collectors.seeds import content_hash, seed_files
from storage import migrate
from storage.db import make_engine, session_factory, transaction
from storage.models import Feed
from tests.conftest import SEEDS
from tests.reliability.conftest import (
    FeedFarm,
    Replicas,
    WebhookReceiver,
    wait_until,
    webhook_target_toml,
)

FEEDS, ENTRIES = 200, 20
PIPELINE_TIMEOUT = 600.0  # seconds for the whole pipeline to drain, on 2 shared cores

AUDIT_SQL = [
    """CREATE TABLE cw_audit (
        id bigserial PRIMARY KEY, tbl text NOT NULL, op text NOT NULL, row_id bigint,
        ref bigint, app text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())""",
    """CREATE FUNCTION cw_audit_classification() RETURNS trigger AS $$
    BEGIN
      INSERT INTO cw_audit (tbl, op, row_id, ref, app)
      VALUES ('classification', TG_OP, NEW.id, NEW.article_id,
              current_setting('application_name'));
      RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER cw_audit_classification AFTER INSERT OR UPDATE ON classification
       FOR EACH ROW EXECUTE FUNCTION cw_audit_classification()""",
    """CREATE FUNCTION cw_audit_delivery() RETURNS trigger AS $$
    BEGIN
      IF NEW.status = 'sent' AND OLD.status IS DISTINCT FROM 'sent' THEN
        INSERT INTO cw_audit (tbl, op, row_id, ref, app)
        VALUES ('delivery', 'sent', NEW.id, NEW.alert_id, current_setting('application_name'));
      END IF;
      RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER cw_audit_delivery AFTER UPDATE ON delivery
       FOR EACH ROW EXECUTE FUNCTION cw_audit_delivery()""",
    """CREATE FUNCTION cw_audit_article() RETURNS trigger AS $$
    BEGIN
      INSERT INTO cw_audit (tbl, op, row_id, ref, app)
      VALUES ('article', TG_OP, NEW.id, NEW.feed_id, current_setting('application_name'));
      RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER cw_audit_article AFTER INSERT ON article
       FOR EACH ROW EXECUTE FUNCTION cw_audit_article()""",
    """CREATE FUNCTION cw_audit_feed() RETURNS trigger AS $$
    BEGIN
      IF NEW.last_checked_at IS DISTINCT FROM OLD.last_checked_at THEN
        INSERT INTO cw_audit (tbl, op, row_id, app)
        VALUES ('feed', 'polled', NEW.id, current_setting('application_name'));
      END IF;
      RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER cw_audit_feed AFTER UPDATE ON feed
       FOR EACH ROW EXECUTE FUNCTION cw_audit_feed()""",
]


@dataclass
class Cluster:
    """The database under test, the feeds, the receiver and the replicas."""

    engine: sa.Engine
    farm: FeedFarm
    receiver: WebhookReceiver
    replicas: Replicas
    expected_articles: int

    def scalar(self, sql: str, **params: object) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(sql), params).scalar() or 0)

    def rows(self, sql: str, **params: object) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def audit(self, tbl: str) -> list[tuple[int, str, str]]:
        """(row id, op, replica) for every audited write to ``tbl``."""
        return [
            (int(r[0]), str(r[1]), str(r[2]))
            for r in self.rows("SELECT row_id, op, app FROM cw_audit WHERE tbl = :t", t=tbl)
        ]

    def progress(self) -> str:
        q = self.scalar
        polled = q("SELECT count(*) FROM feed WHERE last_checked_at IS NOT NULL")
        evaluated = q("SELECT count(*) FROM article WHERE status = 'evaluated'")
        sent = q("SELECT count(*) FROM delivery WHERE status = 'sent'")
        return (
            f"feeds polled {polled}/{FEEDS}, articles {q('SELECT count(*) FROM article')}"
            f"/{self.expected_articles}, classified {q('SELECT count(*) FROM classification')}"
            f", evaluated {evaluated}, alerts {q('SELECT count(*) FROM alert')}, deliveries "
            f"sent {sent}/{q('SELECT count(*) FROM delivery')}, webhooks accepted "
            f"{sum(self.receiver.accepted_ids().values())}"
        )

    def drained(self) -> bool:
        """Every feed polled, every article stored and evaluated, every due alert delivered."""
        return (
            self.scalar("SELECT count(*) FROM feed WHERE last_success_at IS NULL") == 0
            and self.scalar("SELECT count(*) FROM article") == self.expected_articles
            and self.scalar("SELECT count(*) FROM article WHERE status <> 'evaluated'") == 0
            and self.scalar(
                "SELECT count(*) FROM alert WHERE status = 'pending' AND notify_at <= now()"
            )
            == 0
            and self.scalar("SELECT count(*) FROM delivery WHERE status <> 'sent'") == 0
            and len(self.receiver.accepted_ids())
            >= self.scalar("SELECT count(*) FROM delivery WHERE status = 'sent'")
        )

    def wait_drained(self, timeout: float = PIPELINE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.drained():
                return
            for r in self.replicas.replicas:
                proc = r.process.proc
                if proc is not None and proc.returncode is None and proc.poll() is not None:
                    raise AssertionError(f"{r.name} exited:\n{r.log_text[-4000:]}")
            now = self.progress()
            if now != last:
                print(f"[{time.strftime('%H:%M:%S')}] {now}", flush=True)
                last = now
            time.sleep(2)
        raise AssertionError(
            f"pipeline not drained after {timeout:.0f}s: {self.progress()}\n{self.replicas.logs()}"
        )


@pytest.fixture
def cluster(
    pg_url: str, feed_farm: FeedFarm, webhook_receiver: WebhookReceiver, tmp_path: Path
) -> Iterator[Cluster]:
    """A migrated PostgreSQL database with 200 feeds and audit triggers; replicas not started."""
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    urls = feed_farm.generate(FEEDS, ENTRIES)
    options = FeedOptions(default_interval=3600, min_interval=3600)
    now = datetime.now(UTC)
    with transaction(session_factory(engine)) as session:
        for url in urls:
            add_feed(session, url, options, now)
    with engine.begin() as conn:
        for statement in AUDIT_SQL:
            conn.execute(sa.text(statement))
    replicas = Replicas(
        tmp_path / "replicas",
        pg_url,
        count=3,
        config_toml=webhook_target_toml("ops-hook", webhook_receiver.url),
        seeds_dir=SEEDS,
    )
    expected = feed_farm.expected_articles + len(seed_files(SEEDS))
    try:
        yield Cluster(engine, feed_farm, webhook_receiver, replicas, expected)
    finally:
        replicas.kill_all()  # every subprocess, whatever happened
        engine.dispose()


def _log_problems(replicas: Replicas) -> list[str]:
    bad = ("job failed", "duplicate key", "UniqueViolation", "IntegrityError", "lease lost")
    return [
        f"{r.name}: {line}"
        for r in replicas.replicas
        for line in r.log_text.splitlines()
        if any(b in line for b in bad)
    ]


@dataclass
class Figures:
    """What the replicas did, from the database's audit and the receiver."""

    articles: int
    classified_by: Counter[str]
    stored_by: Counter[str]
    polled_by: Counter[str]
    sent_by: Counter[str]
    deliveries: int
    duplicate_webhooks: dict[str, int]
    alerts: int
    stories: int
    relevant: int


def _check_no_double_work(c: Cluster, *, victim: str | None = None) -> Figures:
    """The counts that must hold with or without a killed replica; returns the figures."""
    # Feeds: each fetched exactly once in the cycle, counted by the feed server.
    fetches = c.farm.fetch_counts()
    assert len(fetches) == FEEDS, f"{FEEDS - len(fetches)} feeds never fetched"
    assert set(fetches.values()) == {1}, {p: n for p, n in fetches.items() if n != 1}
    polls = Counter(row for row, _op, _app in c.audit("feed"))
    assert len(polls) == FEEDS and set(polls.values()) == {1}, "a feed's poll was stored twice"

    # Articles: each entry stored once, across feeds too (URL and content dedup, raced).
    articles = c.scalar("SELECT count(*) FROM article")
    assert articles == c.expected_articles
    assert c.scalar("SELECT count(*) - count(DISTINCT url) FROM article WHERE url IS NOT NULL") == 0
    assert (
        c.scalar(
            "SELECT count(*) - count(DISTINCT content_hash) FROM article WHERE length(text) >= 80"
        )
        == 0
    )

    # Classification: exactly one write per article (an insert; never an update).
    writes = c.audit("classification")
    per_article = Counter(
        int(r[0]) for r in c.rows("SELECT ref FROM cw_audit WHERE tbl = 'classification'")
    )
    assert len(per_article) == articles, f"{articles - len(per_article)} articles unclassified"
    doubled = {a: n for a, n in per_article.items() if n > 1}
    assert not doubled, f"articles classified more than once: {doubled}"
    assert {op for _row, op, _app in writes} == {"INSERT"}
    assert c.scalar("SELECT count(*) FROM article WHERE status <> 'evaluated'") == 0

    # Deliveries: each marked sent once; each webhook-id received; repeats only from a victim.
    sent = c.audit("delivery")
    per_delivery = Counter(row for row, _op, _app in sent)
    assert set(per_delivery.values()) <= {1}, "a delivery was marked sent twice"
    keys = {str(r[0]) for r in c.rows("SELECT idempotency_key FROM delivery WHERE status = 'sent'")}
    assert c.scalar("SELECT count(*) FROM delivery WHERE status <> 'sent'") == 0
    accepted = c.receiver.accepted_ids()
    assert set(accepted) == keys, (
        f"lost: {sorted(keys - set(accepted))[:5]}, unknown: {sorted(set(accepted) - keys)[:5]}"
    )
    assert not c.receiver.unverified()
    duplicates = c.receiver.duplicates()
    if victim is None:
        assert not duplicates, f"webhooks delivered twice: {duplicates}"
    return Figures(
        articles=articles,
        classified_by=Counter(app for _r, _o, app in writes),
        stored_by=Counter(app for _r, _o, app in c.audit("article")),
        polled_by=Counter(app for _r, _o, app in c.audit("feed")),
        sent_by=Counter(app for _r, _o, app in sent),
        deliveries=len(keys),
        duplicate_webhooks=duplicates,
        alerts=c.scalar("SELECT count(*) FROM alert"),
        stories=c.scalar("SELECT count(*) FROM story"),
        relevant=c.scalar("SELECT count(*) FROM classification WHERE relevant"),
    )


def test_three_replicas_share_the_work_without_doing_it_twice(cluster: Cluster) -> None:
    c = cluster
    started = time.monotonic()
    c.replicas.start()
    c.wait_drained()
    elapsed = time.monotonic() - started
    figures = _check_no_double_work(c)

    # Every replica took part, and each one's own metrics agree with the database's audit.
    for replica in c.replicas.replicas:
        name = replica.name
        classified = replica.metric_sum("coalition_watch_articles_classified_total")
        assert classified == figures.classified_by[name], name
        polls = replica.metric_sum("coalition_watch_feed_polls_total")
        assert polls == figures.polled_by[name], name
        sent = replica.metric_sum("coalition_watch_deliveries_total", outcome="sent")
        assert sent == figures.sent_by[name], name
    assert len(figures.classified_by) == 3, figures.classified_by
    assert len(figures.polled_by) == 3, figures.polled_by
    assert figures.deliveries > 0, "no alert fired: the rules or the entries are wrong"

    problems = _log_problems(c.replicas)
    assert not problems, "\n".join(problems[:20])
    assert c.replicas.stop_all() == [0, 0, 0]
    print(f"\nthree replicas drained the pipeline in {elapsed:.0f}s: {figures}")


def test_a_replica_killed_mid_work_loses_and_doubles_nothing(cluster: Cluster) -> None:
    c = cluster
    victim = 1
    started = time.monotonic()
    c.replicas.start()
    name = c.replicas[victim].name
    # Polling first (each feed fetched once), then kill while the victim holds a batch.
    wait_until(
        lambda: c.scalar("SELECT count(*) FROM feed WHERE last_success_at IS NULL") == 0,
        timeout=240,
        what="every feed polled",
    )

    def holds(table: str, status: str) -> bool:
        return (
            c.scalar(
                f"SELECT count(*) FROM {table} WHERE claimed_by = :n AND claimed_until > now()"
                " AND status = :s",
                n=name,
                s=status,
            )
            > 0
        )

    # Kill while the victim holds a classification batch and, if that comes within a minute,
    # deliveries in flight too (the receiver answers slowly so that sends overlap the kill).
    c.receiver.delay = 0.3
    patience = time.monotonic() + 60
    wait_until(
        lambda: (
            c.scalar("SELECT count(*) FROM classification") >= 300
            and holds("article", "new")
            and (holds("delivery", "pending") or time.monotonic() > patience)
        ),
        timeout=300,
        interval=0.05,
        what=f"{name} classifying with leases held",
    )
    c.replicas.kill(victim)
    killed_at = time.monotonic() - started
    # Articles it held for classification (status 'new'). It may also hold articles it had
    # classified itself, for alert evaluation: _check_no_double_work sees those evaluated.
    held = {
        int(r[0])
        for r in c.rows(
            "SELECT id FROM article WHERE claimed_by = :n AND claimed_until > now()"
            " AND status = 'new'",
            n=name,
        )
    }
    held_deliveries = {
        str(r[0])
        for r in c.rows(
            "SELECT idempotency_key FROM delivery WHERE claimed_by = :n AND status = 'pending'",
            n=name,
        )
    }
    assert held, f"{name} held no lease when killed"
    c.receiver.delay = 0.0
    c.wait_drained()
    elapsed = time.monotonic() - started
    figures = _check_no_double_work(c, victim=name)

    # The victim's claimed articles were taken over after their leases expired.
    by_article = {
        int(r[0]): str(r[1])
        for r in c.rows("SELECT ref, app FROM cw_audit WHERE tbl = 'classification'")
    }
    taken_over = [a for a in held if by_article.get(a) not in (None, name)]
    assert len(taken_over) == len(held), "an article the victim held was not classified"
    # A webhook may repeat only if the victim was killed between sending it and recording it.
    duplicates = figures.duplicate_webhooks
    assert set(duplicates) <= held_deliveries, duplicates

    survivors = [r for i, r in enumerate(c.replicas.replicas) if i != victim]
    for replica in survivors:
        classified = replica.metric_sum("coalition_watch_articles_classified_total")
        assert classified == figures.classified_by[replica.name]
    problems = [p for p in _log_problems(c.replicas) if not p.startswith(name)]
    assert not problems, "\n".join(problems[:20])
    assert sorted(c.replicas.stop_all()) == [0, 0]
    print(
        f"\n{name} SIGKILLed at {killed_at:.0f}s holding {len(held)} article leases and "
        f"{len(held_deliveries)} delivery leases; drained in {elapsed:.0f}s; {len(taken_over)} "
        f"articles taken over; duplicate webhooks (same webhook-id): {len(duplicates)}; {figures}"
    )


# --- the cross-feed dedup race, directly -------------------------------------------------


def _entry(n: int, now: datetime) -> ParsedEntry:
    title = f"Coalition meeting number {n} in Paris"
    text = (
        f"Leaders of the coalition of the willing met again (meeting {n}) to discuss the "
        "reassurance force and the security guarantees for Ukraine."
    )
    return ParsedEntry(
        guid=f"guid-{n}", url=f"https://wire.example.org/{n}", title=title, text=text,
        language="en", published_at=now, published_source="entry",
        content_hash=content_hash(title, text),
    )  # fmt: skip


def test_cross_feed_dedup_holds_when_two_replicas_store_at_once(pg_url: str) -> None:
    """Two feeds carry the same wire story; two workers store them at the same moment, each in
    its own transaction (as two replicas do). The advisory lock lets one article in."""
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    now = datetime.now(UTC)
    options = FeedOptions()
    try:
        with transaction(sessions) as session:
            feeds = [
                add_feed(session, f"https://feed{i}.example.org/rss", options, now) for i in (1, 2)
            ]
        rounds = 25
        errors: list[BaseException] = []
        for n in range(rounds):
            entries = [_entry(n, now + timedelta(seconds=n))]
            gate = threading.Barrier(2)

            def store(
                feed: Feed,
                entries: list[ParsedEntry] = entries,
                gate: threading.Barrier = gate,
            ) -> None:
                try:
                    with Session(engine) as session, session.begin():
                        gate.wait(timeout=10)
                        store_entries(session, feed, entries, now)
                        time.sleep(0.02)  # hold the transaction open: widen the race window
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=store, args=(f,)) for f in feeds]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert not any(t.is_alive() for t in threads)
        assert not errors, errors
        with engine.connect() as conn:
            total = conn.execute(sa.text("SELECT count(*) FROM article")).scalar()
            urls = conn.execute(sa.text("SELECT count(DISTINCT url) FROM article")).scalar()
        assert total == urls == rounds
    finally:
        engine.dispose()
