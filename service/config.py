"""Configuration: defaults, then an optional TOML file, then ``COALITION_WATCH_*`` variables.

Nested sections use ``__`` in variable names (``COALITION_WATCH_HTTP__PORT=9000``). A secret
may be given as a file: ``COALITION_WATCH_API_TOKEN_FILE=/run/secrets/token`` (any setting name
plus ``_FILE``). Nothing is read at import time: call :func:`load_settings`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from alerts.options import AlertOptions
from collectors.feeds import FeedOptions
from processors.classifier import ClassifierOptions

ENV_PREFIX = "COALITION_WATCH_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class ConfigError(Exception):
    """A setting has a bad value; the message names the setting and the reason."""


class HttpSettings(BaseModel):
    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class SchedulerSettings(BaseModel):
    model_config = {"extra": "forbid"}

    seeds_interval: float = Field(default=300.0, gt=0, description="seconds between seed scans")
    retention_interval: float = Field(default=3600.0, gt=0, description="seconds between purges")
    misfire_grace_time: int = Field(default=60, ge=1)


class LogSettings(BaseModel):
    model_config = {"extra": "forbid"}

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    json_format: bool = Field(default=False, alias="json")


class Settings(BaseSettings):
    """Every setting of the service. Defaults work with no file at all."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    database_url: str = "sqlite:///./data/coalition-watch.db"
    data_dir: Path = Path("data")
    seeds_dir: Path = Path("seeds")
    instance_id: str | None = Field(
        default=None, description="name used in leases; host:pid when empty"
    )
    api_token: SecretStr | None = None
    retention_days: int = Field(
        default=180, ge=0, description="keep processed articles this long; 0 keeps all"
    )
    http: HttpSettings = HttpSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    log: LogSettings = LogSettings()
    alerts: AlertOptions = AlertOptions()
    feeds: FeedOptions = FeedOptions()
    classifier: ClassifierOptions = ClassifierOptions()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment (and *_FILE secrets) beat the TOML file, which is passed as init values.
        return (env_settings, _FileEnvSource(settings_cls), init_settings)


class _FileEnvSource(EnvSettingsSource):
    """``COALITION_WATCH_X_FILE=/path`` supplies setting ``x`` from the file's content."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, env_prefix=ENV_PREFIX, env_nested_delimiter="__")

    def _load_env_vars(self) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for key, path in os.environ.items():
            upper = key.upper()
            if not (upper.startswith(ENV_PREFIX) and upper.endswith("_FILE")):
                continue
            if upper == CONFIG_ENV + "_FILE":
                continue
            name = upper[: -len("_FILE")].lower()
            try:
                values[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{key}: cannot read secret file {path!r}: {exc}") from exc
        return values


def _describe(exc: ValidationError, source_hint: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        lines.append(f"invalid setting {path!r} (env {env}{source_hint}): {err['msg']}")
    return "\n".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Load settings from defaults, ``config_file`` (or ``$COALITION_WATCH_CONFIG``) and env.

    Raises :class:`ConfigError` naming every bad setting and why.
    """
    path_value = config_file or os.environ.get(CONFIG_ENV)
    file_values: dict[str, Any] = {}
    hint = ""
    if path_value:
        path = Path(path_value)
        hint = f" or {path}"
        try:
            with path.open("rb") as fh:
                file_values = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    file_values.update(overrides)
    try:
        return Settings(**file_values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, hint)) from exc
