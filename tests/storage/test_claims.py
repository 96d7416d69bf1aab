from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import select

from storage import migrate
from storage.claims import LEASED_MODELS, claim, release, release_dead_leases, still_owned
from storage.db import SessionFactory, make_engine, session_factory, transaction
from storage.models import Alert, Article, Delivery, Feed, utcnow


@pytest.fixture
def both(any_db_url: str) -> Iterator[SessionFactory]:
    """A migrated database on SQLite and on PostgreSQL."""
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    yield session_factory(engine)
    engine.dispose()


def _articles(sessions: SessionFactory, n: int) -> None:
    with transaction(sessions) as s:
        for i in range(n):
            s.add(
                Article(
                    uid=f"test:{i}", source="seed", guid=str(i), title=f"t{i}", text="x",
                    content_hash=f"h{i}", fetched_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
            )  # fmt: skip


def test_claims_do_not_overlap_and_expired_leases_are_taken_over(
    both: SessionFactory,
) -> None:
    sessions = both
    _articles(sessions, 5)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    kw = dict(where=[Article.status == "new"], order_by=[Article.id], lease=timedelta(minutes=5))
    a = claim(sessions, Article, limit=3, owner="a", now=now, **kw)  # type: ignore[arg-type]
    b = claim(sessions, Article, limit=3, owner="b", now=now, **kw)  # type: ignore[arg-type]
    assert [x.id for x in a] == [1, 2, 3]
    assert [x.id for x in b] == [4, 5]
    assert claim(sessions, Article, limit=3, owner="c", now=now, **kw) == []  # type: ignore[arg-type]
    # "a" finishes article 1: status and lease change in one transaction.
    with transaction(sessions) as s:
        row = still_owned(s, Article, 1, "a")
        assert row is not None
        row.status = "classified"
        release(row)
    # "a" dies holding 2 and 3; after the lease, "c" takes them over.
    later = now + timedelta(minutes=6)
    c = claim(sessions, Article, limit=10, owner="c", now=later, **kw)  # type: ignore[arg-type]
    assert [x.id for x in c] == [2, 3, 4, 5]
    with transaction(sessions) as s:
        assert still_owned(s, Article, 2, "a") is None


def test_concurrent_claimers_never_share_a_row(pg_url: str) -> None:
    """Eight workers claim at once on PostgreSQL: SKIP LOCKED hands each row to one of them."""
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    _articles(sessions, 200)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    got: dict[str, list[int]] = {}
    barrier = threading.Barrier(8)

    def worker(name: str) -> None:
        barrier.wait()
        mine: list[int] = []
        while True:
            rows = claim(
                sessions, Article, where=[Article.status == "new"], order_by=[Article.id],
                limit=7, owner=name, lease=timedelta(minutes=5), now=now,
            )  # fmt: skip
            if not rows:
                break
            mine += [r.id for r in rows if r.id is not None]
        got[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = [i for ids in got.values() for i in ids]
    assert sorted(claimed) == list(range(1, 201))
    assert sum(1 for ids in got.values() if ids) >= 2  # the work really was shared
    engine.dispose()


# --- leases left by dead processes ------------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a process that has certainly exited (and was reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_leases_of_provably_dead_owners_are_released_and_no_other(both: SessionFactory) -> None:
    from service.context import lease_owner_is_dead

    sessions = both
    host = socket.gethostname()
    own = "cw-restarted"  # a configured instance_id, used again by the restarted process
    dead = f"{host}:{_dead_pid()}"
    alive = f"{host}:{os.getpid()}"  # this test's process: alive, and not our name
    parent = f"{host}:{os.getppid()}"
    other_host = f"elsewhere.invalid:{_dead_pid()}"  # dead or not, it cannot be told from here
    custom = "cw-2"
    now = utcnow()
    soon, long_ago = now + timedelta(minutes=10), now - timedelta(hours=1)
    owners = [own, dead, dead, alive, parent, other_host, custom]
    _articles(sessions, len(owners) + 1)
    with transaction(sessions) as s:
        for article_id, owner in enumerate(owners, start=1):
            row = s.get(Article, article_id)
            assert row is not None
            # All unexpired but one: the dead process's second lease has run out already.
            row.claimed_by, row.claimed_until = owner, long_ago if article_id == 3 else soon
        s.add(Feed(url="https://feed.example/a.xml", claimed_by=dead, claimed_until=soon))
        s.add(Feed(url="https://feed.example/b.xml", claimed_by=alive, claimed_until=soon))
        alert = Alert(rule="r", group_key="g", claimed_by=own, claimed_until=soon)
        s.add(alert)
        s.flush()
        assert alert.id is not None
        for target, owner in (("hook", dead), ("mail", custom)):
            s.add(
                Delivery(
                    alert_id=alert.id, target=target, target_kind="webhook", claimed_by=owner,
                    claimed_until=soon, idempotency_key=f"k-{target}",
                )
            )  # fmt: skip

    judged: list[str] = []

    def owner_is_dead(owner: str) -> bool:
        judged.append(owner)
        return lease_owner_is_dead(owner, own_id=own, hostname=host)

    released = release_dead_leases(sessions, owner_is_dead)

    assert released == {own: 2, dead: 4}  # own: article + alert; dead: 2 articles, feed, delivery
    assert sorted(judged) == sorted(set(owners)), "each owner judged once"

    def rows(model: Any) -> list[Any]:
        with sessions() as s:
            return list(s.exec(select(model)).all())

    leases = {
        (model.__name__, row.id): (row.claimed_by, row.claimed_until is not None)
        for model in LEASED_MODELS
        for row in rows(model)
    }
    assert leases == {
        ("Article", 1): (None, False),
        ("Article", 2): (None, False),
        ("Article", 3): (None, False),
        ("Article", 4): (alive, True),
        ("Article", 5): (parent, True),
        ("Article", 6): (other_host, True),
        ("Article", 7): (custom, True),
        ("Article", 8): (None, False),  # never claimed
        ("Feed", 1): (None, False),
        ("Feed", 2): (alive, True),
        ("Alert", 1): (None, False),
        ("Delivery", 1): (None, False),
        ("Delivery", 2): (custom, True),
    }
    assert release_dead_leases(sessions, owner_is_dead) == {}  # nothing left to release


def test_a_lease_taken_over_between_the_read_and_the_release_is_kept(
    both: SessionFactory,
) -> None:
    """A live worker claims one of the dead owner's (expired) rows while it is being judged."""
    sessions = both
    _articles(sessions, 3)
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    kw = dict(where=[Article.status == "new"], order_by=[Article.id], limit=10)
    claim(sessions, Article, owner="gone", lease=timedelta(minutes=1), now=now, **kw)  # type: ignore[arg-type]

    def owner_is_dead(owner: str) -> bool:
        # After the owners were read, before the update: "live" takes over article 1 only.
        with transaction(sessions) as s:
            row = s.get(Article, 1)
            assert row is not None and row.claimed_by == "gone"
            row.claimed_by, row.claimed_until = "live", now + timedelta(minutes=30)
        return owner == "gone"

    assert release_dead_leases(sessions, owner_is_dead) == {"gone": 2}
    with sessions() as s:
        owners = s.exec(select(Article.claimed_by).order_by(Article.id)).all()  # type: ignore[arg-type]
    assert owners == ["live", None, None]


def test_the_liveness_rule_judges_only_this_host_s_pids_and_its_own_name() -> None:
    from service.context import lease_owner_is_dead, pid_is_running

    host, gone = "box-1", _dead_pid()

    def dead(owner: str, own_id: str | None = None) -> bool:
        return lease_owner_is_dead(owner, own_id=own_id, hostname=host)

    assert pid_is_running(os.getpid()) and pid_is_running(os.getppid())
    assert not pid_is_running(gone)
    assert dead(f"box-1:{gone}")
    assert not dead(f"box-1:{os.getpid()}")  # alive
    assert dead(f"box-1:{os.getpid()}", own_id=f"box-1:{os.getpid()}")  # but our own name
    assert dead("cw-1", own_id="cw-1") and not dead("cw-1", own_id="cw-2")
    assert not dead(f"box-2:{gone}")  # another host
    assert not dead(f"box-1.example.org:{gone}")  # not the name this host goes by
    # A name that only looks like host:pid is not judged: no pid, pid 0 (the process group),
    # negative, non-ASCII digits, trailing text.
    for owner in ("box-1", "box-1:", "box-1:0", "box-1:-5", "box-1:١٢٣", f"box-1:{gone}x", ":1"):
        assert not dead(owner), owner
    # A host name with colons (an IPv6 literal) keeps everything before the last one.
    assert lease_owner_is_dead(f"fe80::1:{gone}", own_id=None, hostname="fe80::1")
