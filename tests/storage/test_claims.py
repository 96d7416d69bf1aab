from __future__ import annotations

from datetime import UTC, datetime, timedelta

from storage.claims import claim, release, still_owned
from storage.db import SessionFactory, transaction
from storage.models import Article


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
    sessions: SessionFactory,
) -> None:
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
