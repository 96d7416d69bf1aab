"""PostgreSQL restarted under a running service: it carries on, nothing lost, nothing doubled.

A real ``coalition-watch run`` subprocess works on a fresh PostgreSQL database (feeds from a
local farm, the real classifier, alerts to a local webhook receiver). While it works, the
PostgreSQL server itself is restarted with ``pg_ctlcluster … restart``. Afterwards the service
must carry on by itself: articles ingested before and after the restart are all classified
exactly once (counted by a trigger on every write to ``classification``), every alert is
delivered once (counted by ``webhook-id`` at the receiver), ``/healthz`` answered 200 the whole
time and ``/readyz`` is 200 again.

Restarting PostgreSQL disrupts every other user of that server, which is why this test has its
own file. It needs ``pg_ctlcluster`` (Debian's postgresql-common) on the machine that runs the
test PostgreSQL, and the rights to use it: without them it is skipped with the reason, and
under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlmodel import col

from collectors.feeds import FeedOptions, add_feed
from storage import migrate
from storage.db import make_engine, session_factory, transaction
from storage.models import Alert
from tests.conftest import PG_ADMIN_URL
from tests.reliability.conftest import (
    FeedFarm,
    Replicas,
    WebhookReceiver,
    wait_until,
    webhook_target_toml,
)

FEEDS_BEFORE, FEEDS_AFTER, ENTRIES = 3, 3, 10
STEP_TIMEOUT = 180.0  # seconds for one phase (model loading, classification) on 2 shared cores

AUDIT_SQL = [
    "CREATE TABLE cw_classification_writes (article_id bigint NOT NULL, op text NOT NULL)",
    """CREATE FUNCTION cw_classification_write() RETURNS trigger AS $$
    BEGIN
      INSERT INTO cw_classification_writes (article_id, op) VALUES (NEW.article_id, TG_OP);
      RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE TRIGGER cw_classification_write AFTER INSERT OR UPDATE ON classification
       FOR EACH ROW EXECUTE FUNCTION cw_classification_write()""",
]


def unavailable(reason: str) -> NoReturn:
    message = f"cannot restart PostgreSQL for this test: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def restart_command() -> list[str]:
    """``pg_ctlcluster --skip-systemctl-redirect <version> main restart`` for the cluster that
    serves the test URL (the one whose port it uses)."""
    ctl = shutil.which("pg_ctlcluster")
    if ctl is None:
        unavailable("pg_ctlcluster not found (Debian's postgresql-common)")
    url = make_url(PG_ADMIN_URL)
    if url.host not in (None, "", "127.0.0.1", "localhost", "::1"):
        unavailable(f"the test PostgreSQL ({url.host}) is not on this machine")
    if os.geteuid() != 0 and os.environ.get("USER") != "postgres":
        unavailable("pg_ctlcluster needs root or the postgres user")
    root = Path("/etc/postgresql")
    port = str(url.port or 5432)
    versions = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    for version in versions:
        conf = root / version / "main" / "postgresql.conf"
        lines = conf.read_text().splitlines() if conf.is_file() else []
        settings = [ln.split("#", 1)[0].split("=", 1) for ln in lines]
        ports = [kv[1].strip() for kv in settings if len(kv) == 2 and kv[0].strip() == "port"]
        if ports == [port] or (not ports and port == "5432"):
            return [ctl, "--skip-systemctl-redirect", version, "main", "restart"]
    unavailable(f"no cluster 'main' on port {port} under /etc/postgresql ({versions})")


def pg_ready(timeout: float) -> float:
    """Wait for ``pg_isready``; the seconds it took."""
    url = make_url(PG_ADMIN_URL)
    command = ["pg_isready", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
    started = time.monotonic()
    wait_until(
        lambda: subprocess.run(command, capture_output=True, timeout=10).returncode == 0,
        timeout,
        interval=0.2,
        what="pg_isready after the restart",
    )
    return time.monotonic() - started


@dataclass
class Probes:
    """Polls ``/healthz`` and ``/readyz`` every 100 ms in a thread: (time, path, status)."""

    base: str
    seen: list[tuple[float, str, int | str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.wait(0.1):
                for path in ("/healthz", "/readyz"):
                    try:
                        status: int | str = client.get(self.base + path).status_code
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    self.seen.append((time.monotonic(), path, status))

    def of(self, path: str, since: float = 0.0) -> list[int | str]:
        return [s for t, p, s in list(self.seen) if p == path and t >= since]


@pytest.fixture
def probes_for() -> Iterator[list[Probes]]:
    started: list[Probes] = []
    yield started
    for p in started:
        p.stop.set()


def test_service_carries_on_through_a_postgresql_restart(
    pg_url: str,
    feed_farm: FeedFarm,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
    probes_for: list[Probes],
) -> None:
    command = restart_command()
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        for statement in AUDIT_SQL:
            conn.execute(sa.text(statement))
    urls = feed_farm.generate(FEEDS_BEFORE + FEEDS_AFTER, ENTRIES)
    before, after = urls[:FEEDS_BEFORE], urls[FEEDS_BEFORE:]
    options = FeedOptions(default_interval=3600, min_interval=3600)
    sessions = session_factory(engine)

    def add_feeds(feed_urls: list[str]) -> None:
        with transaction(sessions) as session:
            for url in feed_urls:
                add_feed(session, url, options, datetime.now(UTC))

    def q(sql: str) -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(sql)).scalar() or 0)

    def due_alerts() -> int:
        query = (
            sa.select(sa.func.count())
            .select_from(Alert)
            .where(col(Alert.status) == "pending", col(Alert.notify_at) <= datetime.now(UTC))
        )
        with engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    replicas = Replicas(
        tmp_path / "service",
        pg_url,
        count=1,
        config_toml=webhook_target_toml("ops-hook", webhook_receiver.url),
    )
    try:
        add_feeds(before)
        replicas.start()
        replica = replicas[0]
        probes = Probes(replica.process.base)
        probes_for.append(probes)
        threading.Thread(target=probes.run, daemon=True).start()

        def step(predicate: object, what: str) -> None:
            def check() -> object:
                if not replica.alive:
                    raise AssertionError(f"the service exited:\n{replica.log_text[-4000:]}")
                return predicate()  # type: ignore[operator]

            try:
                wait_until(check, STEP_TIMEOUT, interval=0.2, what=what)
            except AssertionError as exc:
                evaluated = q("SELECT count(*) FROM article WHERE status = 'evaluated'")
                progress = (
                    f"articles {q('SELECT count(*) FROM article')}, classified "
                    f"{q('SELECT count(*) FROM classification')}, evaluated {evaluated}, "
                    f"deliveries {q('SELECT count(*) FROM delivery')}"
                )
                raise AssertionError(f"{exc}\n{progress}\n{replica.log_text[-5000:]}") from None

        # Mid-run: the first feeds' articles are stored and the classifier has started on them.
        step(
            lambda: (
                q("SELECT count(*) FROM article") == FEEDS_BEFORE * ENTRIES
                and q("SELECT count(*) FROM classification") > 0
            ),
            "the first feeds stored and classification under way",
        )
        at_restart = {
            "classified": q("SELECT count(*) FROM classification"),
            "evaluated": q("SELECT count(*) FROM article WHERE status = 'evaluated'"),
            "deliveries": q("SELECT count(*) FROM delivery"),
        }
        restart_at = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
        restart_seconds = time.monotonic() - restart_at
        ready_after = pg_ready(60)
        back_at = time.monotonic()

        # The service answers /readyz again by itself (its pool reconnects).
        step(lambda: probes.of("/readyz", since=back_at)[-1:] == [200], "/readyz 200 again")
        readyz_back = time.monotonic() - back_at

        # Articles ingested after the restart: new feeds, polled by the running service.
        add_feeds(after)
        total = (FEEDS_BEFORE + FEEDS_AFTER) * ENTRIES
        assert feed_farm.expected_articles == total
        step(
            lambda: (
                q("SELECT count(*) FROM article") == total
                and q("SELECT count(*) FROM article WHERE status <> 'evaluated'") == 0
                and due_alerts() == 0
                and q("SELECT count(*) FROM delivery WHERE status <> 'sent'") == 0
                and len(webhook_receiver.accepted_ids()) == q("SELECT count(*) FROM delivery")
            ),
            "every article classified and evaluated, every alert delivered",
        )
        probes.stop.set()

        # Classified once each: one classification per article, and one write of it.
        with engine.connect() as conn:
            writes = Counter(
                int(a)
                for (a,) in conn.execute(sa.text("SELECT article_id FROM cw_classification_writes"))
            )
        classified = q("SELECT count(DISTINCT article_id) FROM classification")
        assert classified == total == q("SELECT count(*) FROM classification")
        assert len(writes) == total and set(writes.values()) == {1}, {
            a: n for a, n in writes.items() if n != 1
        }
        # Delivered once each, counted by webhook-id at the receiver.
        with engine.connect() as conn:
            keys = {
                str(k) for (k,) in conn.execute(sa.text("SELECT idempotency_key FROM delivery"))
            }
        assert set(webhook_receiver.accepted_ids()) == keys
        assert webhook_receiver.duplicates() == {} and webhook_receiver.unverified() == []
        # /healthz never failed; /readyz failed at most while the database was away.
        healthz = Counter(probes.of("/healthz"))
        readyz = Counter(probes.of("/readyz"))
        assert set(healthz) == {200}, healthz
        assert set(readyz) <= {200, 503}, readyz
        errors_before = replica.metric_sum("coalition_watch_stage_runs_total", outcome="error")
        print(
            f"\npg restart: took {restart_seconds:.1f}s (+{ready_after:.1f}s to pg_isready), "
            f"at the restart {at_restart}; /readyz 200 again {readyz_back:.1f}s after "
            f"pg_isready; /healthz {dict(healthz)}, /readyz {dict(readyz)}; job runs that "
            f"failed: {errors_before:.0f}; articles {total}, classified once each; "
            f"{len(keys)} deliveries, {sum(webhook_receiver.accepted_ids().values())} webhooks "
            "accepted, 0 duplicates"
        )
        # It keeps working: more job runs succeed after the restart, and it stops cleanly.
        ok_runs = replica.metric_sum("coalition_watch_stage_runs_total", outcome="ok")
        wait_until(
            lambda: (
                replica.metric_sum("coalition_watch_stage_runs_total", outcome="ok") > ok_runs + 3
            ),
            30,
            what="more successful job runs",
        )
        assert replicas.stop_all() == [0]
    finally:
        replicas.kill_all()
        engine.dispose()
