"""Notifier plugins: one class per target ``kind``, registered by ``__init_subclass__``.

A plugin declares its options as a pydantic model (a subclass of :class:`TargetOptions`), so a
bad target entry fails when the configuration is loaded, with the target's name. A send either
returns (delivered) or raises :class:`DeliveryError`, which says whether to retry and when.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alerts.notification import Notification
from storage.models import utcnow


class TargetOptions(BaseModel):
    """Options every target has; each kind adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: str

    def digest_window_seconds(self) -> float | None:
        """Deliveries to this target are batched per window of this many seconds, or not."""
        return None


class DeliveryError(Exception):
    """A failed send. ``permanent``: do not retry. ``retry_after``: seconds the target asked."""

    def __init__(
        self, message: str, *, permanent: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


@dataclass
class NotifierDeps:
    """What notifiers are given: an HTTP client (webhooks) and the clock."""

    http: httpx.AsyncClient | None = None
    clock: Callable[[], datetime] = utcnow


@dataclass(frozen=True)
class Outgoing:
    """One message to send: a notification, or several in one digest. ``key`` is its identity:
    the ``webhook-id`` header or the ``Message-ID``'s local part, the same on every retry."""

    key: str
    notifications: Sequence[Notification]
    digest_window: tuple[datetime, datetime] | None = None


class Notifier(ABC):
    kind: ClassVar[str]
    Options: ClassVar[type[TargetOptions]]
    registry: ClassVar[dict[str, type[Notifier]]] = {}

    def __init_subclass__(cls, kind: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind in Notifier.registry:
            raise TypeError(f"notifier kind {kind!r} is registered twice")
        cls.kind = kind
        Notifier.registry[kind] = cls

    def __init__(self, options: TargetOptions, deps: NotifierDeps) -> None:
        self.options = options
        self.deps = deps

    @property
    def name(self) -> str:
        return self.options.name

    @abstractmethod
    async def send(self, message: Outgoing) -> str:
        """Send ``message``; return a short receipt for logs (e.g. the HTTP status).

        Raise :class:`DeliveryError` on failure.
        """


def load_builtin_kinds() -> None:
    """Import the plugin modules shipped here, which registers their kinds."""
    import alerts.email
    import alerts.webhook  # noqa: F401


def parse_target(raw: object, index: int) -> TargetOptions:
    """Validate one configured target with its kind's options model."""
    load_builtin_kinds()
    if isinstance(raw, TargetOptions):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"targets[{index}]: expected a table with name and kind")
    name = raw.get("name")
    who = f"target {name!r}" if isinstance(name, str) else f"targets[{index}]"
    kind = raw.get("kind")
    if kind not in Notifier.registry:
        known = ", ".join(sorted(Notifier.registry))
        raise ValueError(f"{who}: unknown kind {kind!r} (known kinds: {known})")
    try:
        return Notifier.registry[str(kind)].Options.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {_msg(e)}" for e in exc.errors()
        )
        raise ValueError(f"{who}: {problems}") from None


def _msg(err: Any) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown option"
    return msg.removeprefix("Value error, ")


def build_notifier(options: TargetOptions, deps: NotifierDeps) -> Notifier:
    load_builtin_kinds()
    return Notifier.registry[options.kind](options, deps)
