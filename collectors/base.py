"""Collector plugins: each registers itself by a ``kind`` string with a pydantic options model.

A subclass declares ``class FeedCollector(Collector, kind="feeds")`` and sets ``Options``;
:func:`collector_class` finds it by kind, and :func:`options_for` validates its options so a
bad setting fails at load time with the collector's kind in the message.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

_REGISTRY: dict[str, type[Collector]] = {}


class Collector:
    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise TypeError(f"collector kind {kind!r} is registered twice")
        cls.kind = kind
        _REGISTRY[kind] = cls


def collector_class(kind: str) -> type[Collector]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown collector kind {kind!r} (known: {known})") from None


def options_for(kind: str, values: dict[str, Any]) -> BaseModel:
    cls = collector_class(kind)
    try:
        return cls.Options.model_validate(values)
    except ValidationError as exc:
        raise ValueError(f"collector {kind!r}: invalid options: {exc}") from exc
