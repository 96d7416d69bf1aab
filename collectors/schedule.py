"""When to check a feed next, and why: pure functions of what the last poll saw.

After a success the next check is one interval away. The interval is the feed's fixed one
when a user set it; otherwise it adapts to how often the feed publishes (half the observed
time between entries, kept between a minimum and a maximum), and it is the default interval
while nothing is known. The server can only push it later: the feed's ``<ttl>``,
``Cache-Control: max-age``. After a failure the next check backs off exponentially with
jitter up to a cap, and never sooner than a ``Retry-After``. Every result carries a short
reason that ``feeds list`` shows.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

# Publication dates closer together than this are generation stamps, not a rhythm.
_SAME_STAMP_SECONDS = 60
_RECENT_ENTRIES = 10
_MIN_DATED_ENTRIES = 3
_REASON_MAX = 250


class ScheduleOptions(Protocol):
    default_interval: int
    min_interval: int
    max_interval: int
    adaptive: bool
    adaptive_factor: float
    backoff_base: int
    backoff_cap: int
    max_server_delay: int


@dataclass(frozen=True)
class NextCheck:
    at: datetime
    seconds: float
    reason: str


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``15 min``, ``2 h 5 min``, ``1 d 3 h``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    minutes = round(s / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def parse_duration(text: str) -> int:
    """Seconds from ``900``, ``90s``, ``15m``, ``2h``, ``1d`` (ValueError otherwise)."""
    m = re.fullmatch(r"\s*(\d+)\s*(s|sec|m|min|h|d)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 900, 15m, 2h, 1d)")
    unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
    return int(m.group(1)) * unit


def observed_entry_gap(dates: Iterable[datetime], now: datetime) -> float | None:
    """Mean seconds between the feed's recent entries, counting the quiet time since the
    newest one (so a feed that stopped publishing looks slower); None without enough dates.
    """
    recent = sorted({d for d in dates if d <= now}, reverse=True)[:_RECENT_ENTRIES]
    if len(recent) < _MIN_DATED_ENTRIES:
        return None
    if (recent[0] - recent[-1]).total_seconds() < _SAME_STAMP_SECONDS:
        return None  # every entry stamped with the generation time: no information
    return (now - recent[-1]).total_seconds() / len(recent)


def max_age(headers: Mapping[str, str]) -> float | None:
    """``Cache-Control: max-age`` in seconds (None for no-cache/no-store or absent)."""
    value = headers.get("cache-control", "").lower()
    if "no-cache" in value or "no-store" in value:
        return None
    m = re.search(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", value)
    return float(m.group(1)) if m else None


def _clip(reason: str) -> str:
    return reason if len(reason) <= _REASON_MAX else reason[: _REASON_MAX - 1] + "…"


def after_success(
    now: datetime,
    options: ScheduleOptions,
    *,
    interval: int,
    fixed: bool,
    entry_gap: float | None,
    ttl_seconds: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> NextCheck:
    """The next check after a good answer (new content, 304, or the same body)."""
    if fixed:
        seconds = float(interval)
        why = f"every {fmt_duration(seconds)} (fixed interval)"
    elif options.adaptive and entry_gap is not None:
        raw = entry_gap * options.adaptive_factor
        seconds = min(max(raw, options.min_interval), options.max_interval)
        bound = ""
        if raw < options.min_interval:
            bound = ", the minimum"
        elif raw > options.max_interval:
            bound = ", the maximum"
        why = (
            f"every {fmt_duration(seconds)} (adaptive{bound}: "
            f"an entry every ~{fmt_duration(entry_gap)})"
        )
    else:
        seconds = float(interval)
        label = "default interval" if interval == options.default_interval else "interval"
        why = f"every {fmt_duration(seconds)} ({label})"
    floors: list[tuple[float, str]] = []
    if ttl_seconds:
        floors.append((float(ttl_seconds), f"the feed's <ttl> asks {fmt_duration(ttl_seconds)}"))
    age = max_age(headers or {})
    if age:
        floors.append((age, f"the server's Cache-Control max-age is {fmt_duration(age)}"))
    for floor, floor_why in floors:
        floor = min(floor, float(options.max_server_delay))
        if floor > seconds:
            seconds = floor
            why = f"{floor_why}; {why}"
    return NextCheck(now + timedelta(seconds=seconds), seconds, _clip(why))


def backoff_seconds(failures: int, options: ScheduleOptions, rng: random.Random) -> float:
    """Exponential backoff with jitter: a random point in [base·2^(n-1), base·2^n), capped.
    Successive delays never shrink while the failures go on, and the cap is exact."""
    exponent = min(max(failures, 1) - 1, 30)
    ceiling = options.backoff_base * 2.0**exponent * (1 + rng.random())
    return min(float(options.backoff_cap), ceiling)


def after_failure(
    now: datetime,
    options: ScheduleOptions,
    *,
    failures: int,
    kind: str,
    retry_after: float | None,
    rng: random.Random,
) -> NextCheck:
    """The next check after failure number ``failures`` in a row (the feed is never dropped)."""
    seconds = backoff_seconds(failures, options, rng)
    ordinal = "1 failure" if failures == 1 else f"{failures} failures in a row"
    why = f"retry after {ordinal} ({kind}; backoff, cap {fmt_duration(options.backoff_cap)})"
    if retry_after is not None:
        asked = min(retry_after, float(options.max_server_delay))
        if asked > seconds:
            seconds = asked
            why = f"the server's Retry-After asks {fmt_duration(asked)}; {why}"
    return NextCheck(now + timedelta(seconds=seconds), seconds, _clip(why))
