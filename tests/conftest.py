"""Shared fixtures: each test owns its data (a fresh SQLite file, migrated)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from storage import migrate
from storage.db import SessionFactory, make_engine, scratch_postgres_database, session_factory

REPO = Path(__file__).resolve().parent.parent
SEEDS = REPO / "seeds"


PG_ADMIN_URL = os.environ.get(
    "COALITION_WATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_reachable() -> str | None:
    """None when the test PostgreSQL answers, else why not."""
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return f"{exc.__class__.__name__}: {exc}".splitlines()[0]


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test, dropped afterwards."""
    why = _pg_reachable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} unreachable under CI=true: {why}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} unreachable: {why}")
    with scratch_postgres_database(PG_ADMIN_URL, "cw_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL, once per backend (storage tests run against both)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'any.db'}"
        return
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'test.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def sessions(db_url: str) -> Iterator[SessionFactory]:
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """``coalition-watch run`` as a real subprocess on a free port."""

    def __init__(self, workdir: Path, env: dict[str, str], port: int) -> None:
        self.workdir = workdir
        self.env = env
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = workdir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            cwd=self.workdir, env=self.env, capture_output=True, text=True, check=check,
            timeout=300,
        )  # fmt: skip

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run"],
            cwd=self.workdir, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_http(self, path: str = "/healthz", timeout: float = 60, status: int = 200) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited early:\n{self.log.read_text()}")
            try:
                r = httpx.get(self.base + path, timeout=2)
                if r.status_code == status:
                    return
                last = r.status_code
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise AssertionError(
            f"{path} not {status} after {timeout}s ({last}):\n{self.log.read_text()}"
        )

    def stop(self, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def service_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    port = free_port()
    env.update(
        COALITION_WATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'svc.db'}",
        COALITION_WATCH_HTTP__PORT=str(port),
        COALITION_WATCH_SEEDS_DIR=str(SEEDS),
        PYTHONPATH=str(REPO),
    )
    return env


@pytest.fixture
def service(tmp_path: Path, service_env: dict[str, str]) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(tmp_path, service_env, int(service_env["COALITION_WATCH_HTTP__PORT"]))
    yield svc
    svc.kill()
