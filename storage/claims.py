"""Claim/lease queries: how pending work is shared without double work.

A claim is a short transaction: pick due rows whose lease is free or expired, stamp them with
``claimed_by``/``claimed_until``, commit. The worker then does the work and, in the transaction
that stores the result, changes the row's status and clears the lease (:func:`release`). A crash
leaves the lease to expire, and the row is claimed again by whoever comes next; a process that
starts clears at once the leases of owners it can tell are dead (:func:`release_dead_leases`).

On PostgreSQL the pick is ``SELECT … FOR UPDATE SKIP LOCKED``, so replicas sharing one database
never pick the same row. On SQLite (one process) the conditional UPDATE is enough.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlmodel import Session, SQLModel

from storage.db import SessionFactory
from storage.models import Alert, Article, Delivery, Feed

M = TypeVar("M", bound=SQLModel)

# Every table whose rows are claimed with a lease.
LEASED_MODELS: tuple[type[SQLModel], ...] = (Feed, Article, Alert, Delivery)


def lease_free(model: Any, now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(model.claimed_until.is_(None), model.claimed_until < now)


def claim(
    sessions: SessionFactory,
    model: type[M],
    *,
    where: Sequence[Any],
    order_by: Sequence[Any],
    limit: int,
    owner: str,
    lease: timedelta,
    now: datetime,
) -> list[M]:
    """Claim up to ``limit`` rows of ``model`` matching ``where`` whose lease is free.

    Returns the claimed rows (detached, with their fresh lease), in ``order_by`` order.
    """
    table: Any = model
    until = now + lease
    with sessions() as session:
        pick = (
            sa.select(table.id)
            .where(*where, lease_free(table, now))
            .order_by(*order_by)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        ids = list(session.execute(pick).scalars())
        if not ids:
            session.rollback()
            return []
        session.execute(
            sa.update(table)
            .where(table.id.in_(ids), lease_free(table, now))
            .values(claimed_by=owner, claimed_until=until)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        rows = session.execute(
            sa.select(table).where(
                table.id.in_(ids), table.claimed_by == owner, table.claimed_until == until
            )
        ).scalars()
        by_id = {row.id: row for row in rows}
        session.expunge_all()
    return [by_id[i] for i in ids if i in by_id]


def release(row: Any) -> None:
    """Clear a row's lease; call it in the transaction that stores the row's result."""
    row.claimed_by = None
    row.claimed_until = None


def still_owned(session: Session, model: type[M], row_id: int, owner: str) -> M | None:
    """Re-read a claimed row inside the storing transaction, locked on PostgreSQL.

    Returns None when the lease was lost (expired and taken by another worker), in which case
    the caller must not store its result.
    """
    table: Any = model
    stmt = sa.select(table).where(table.id == row_id, table.claimed_by == owner)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.execute(stmt).scalars().first()


def release_dead_leases(
    sessions: SessionFactory, owner_is_dead: Callable[[str], bool]
) -> dict[str, int]:
    """Clear every lease, expired or not, whose owner ``owner_is_dead`` judges dead.

    Each owner is judged once. Each table is read, then updated in its own short transaction,
    ``WHERE claimed_by = <dead owner>``: a row that a live worker claimed in between keeps its
    new lease. Returns the number of leases cleared per owner (owners with none are left out).
    """
    verdicts: dict[str, bool] = {}

    def dead(owner: str) -> bool:
        if owner not in verdicts:
            verdicts[owner] = owner_is_dead(owner)
        return verdicts[owner]

    released: dict[str, int] = {}
    for model in LEASED_MODELS:
        table: Any = model
        with sessions() as session:
            owners = list(
                session.execute(
                    sa.select(table.claimed_by).where(table.claimed_by.is_not(None)).distinct()
                ).scalars()
            )
        gone = [owner for owner in owners if dead(owner)]
        if not gone:
            continue
        with sessions() as session:
            connection = session.connection()  # its results count the rows updated
            for owner in gone:
                cleared = connection.execute(
                    sa.update(table)
                    .where(table.claimed_by == owner)
                    .values(claimed_by=None, claimed_until=None)
                )
                released[owner] = released.get(owner, 0) + cleared.rowcount
            session.commit()
    return {owner: n for owner, n in released.items() if n}
