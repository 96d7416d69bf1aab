from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import storage.models  # noqa: F401
from storage import migrate
from storage.db import make_engine


def test_migrations_from_empty_match_the_models(any_db_url: str) -> None:
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, SQLModel.metadata)
    assert diff == [], diff
    assert migrate.is_up_to_date(engine)
    tables = set(sa.inspect(engine).get_table_names())
    assert {"feed", "article", "classification", "story", "alert", "delivery"} <= tables
    engine.dispose()


def test_migrations_downgrade_to_empty_and_back(any_db_url: str) -> None:
    migrate.upgrade(any_db_url)
    migrate.downgrade(any_db_url, "base")
    engine = make_engine(any_db_url)
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate.upgrade(any_db_url)


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'w.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
