from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ConfigError, load_settings
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("COALITION_WATCH_"):
            monkeypatch.delenv(key)


def test_defaults_need_no_file() -> None:
    s = load_settings()
    assert s.database_url == "sqlite:///./data/coalition-watch.db"
    assert s.http.host == "127.0.0.1" and s.http.port == 8000
    assert s.api_token is None


def test_file_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cw.toml"
    cfg.write_text(
        'database_url = "sqlite:///from-file.db"\n[http]\nport = 9100\nhost = "0.0.0.0"\n',
        encoding="utf-8",
    )
    s = load_settings(cfg)
    assert s.database_url == "sqlite:///from-file.db"
    assert s.http.port == 9100
    monkeypatch.setenv("COALITION_WATCH_HTTP__PORT", "9200")
    monkeypatch.setenv("COALITION_WATCH_DATABASE_URL", "sqlite:///from-env.db")
    s = load_settings(cfg)
    assert s.http.port == 9200
    assert s.http.host == "0.0.0.0"  # still from the file
    assert s.database_url == "sqlite:///from-env.db"
    monkeypatch.setenv("COALITION_WATCH_CONFIG", str(cfg))
    monkeypatch.delenv("COALITION_WATCH_HTTP__PORT")
    assert load_settings().http.port == 9100


def test_secret_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n", encoding="utf-8")
    monkeypatch.setenv("COALITION_WATCH_API_TOKEN_FILE", str(secret))
    s = load_settings()
    assert s.api_token is not None and s.api_token.get_secret_value() == "s3cret"
    monkeypatch.setenv("COALITION_WATCH_API_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="COALITION_WATCH_API_TOKEN_FILE"):
        load_settings()


def test_bad_values_name_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COALITION_WATCH_HTTP__PORT", "eighty")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "http.port" in str(err.value) and "COALITION_WATCH_HTTP__PORT" in str(err.value)
    assert "integer" in str(err.value)
    monkeypatch.delenv("COALITION_WATCH_HTTP__PORT")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[http]\nprot = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"http\.prot"):
        load_settings(cfg)
    cfg.write_text("[http\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_cli_reports_a_bad_value_and_exits_2(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    env["COALITION_WATCH_HTTP__PORT"] = "99999"
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "articles", "list"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "http.port" in proc.stderr and "65535" in proc.stderr
