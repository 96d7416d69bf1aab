"""Engine and session factory. Nothing here runs at import time: callers pass a URL."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

SessionFactory = Callable[[], Session]


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str, *, echo: bool = False) -> sa.Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    A SQLite file's folder is created when missing, so the default ``./data/…`` works on a
    fresh clone. Pools pre-ping so a restarted database server is reconnected transparently.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    return sa.create_engine(
        url, echo=echo, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_recycle=1800
    )


def session_factory(engine: sa.Engine) -> SessionFactory:
    maker = sessionmaker(bind=engine, class_=Session, expire_on_commit=False)
    return maker


@contextmanager
def transaction(factory: SessionFactory) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_sqlite(engine: sa.Engine) -> bool:
    return engine.dialect.name == "sqlite"


def begin_write(session: Session) -> None:
    """On SQLite, take the database write lock now, before this transaction reads anything.

    SQLite's driver starts a transaction only at the first write, so rows read before it may
    change underneath (another thread's commit) and a read-modify-write would lose that
    update. Taken first, the lock makes the whole transaction serial. Other databases need
    nothing here: lock the rows you read with ``SELECT … FOR UPDATE`` instead.
    """
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        return
    if not conn.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def serialize(session: Session, name: str) -> None:
    """Run the rest of this transaction alone among all that serialize on ``name``.

    On PostgreSQL: ``pg_advisory_xact_lock(hashtext(name))``, released by the commit or
    rollback. Use it where a uniqueness rule cannot be a unique index (an entry is new when no
    stored article has its URL *or* its content hash): two replicas checking and inserting at
    once would both see nothing and both insert. Statements after the lock see every
    transaction that held it before. Keep such transactions short. SQLite needs nothing: one
    process, and :func:`begin_write` already makes a writing transaction serial.
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": name})


@contextmanager
def scratch_postgres_database(admin_url: str, prefix: str = "cw_scratch") -> Iterator[str]:
    """Create an empty PostgreSQL database next to ``admin_url``'s, yield its URL, drop it.

    For tests and benchmarks that each need a database of their own. The admin engine
    pre-pings, so a server restarted in between (fault tests) does not break the drop.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
