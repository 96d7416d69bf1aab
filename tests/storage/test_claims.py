from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from storage import migrate
from storage.claims import claim, release, still_owned
from storage.db import SessionFactory, make_engine, session_factory, transaction
from storage.models import Article


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
