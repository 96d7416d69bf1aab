"""Structured logs: fixed keys (feed_url, article_id, rule, target, ...), JSON optional."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Keys that stages put in ``extra=``; they are printed whenever present.
FIXED_KEYS = (
    "feed_url", "article_id", "rule", "target", "delivery_id", "alert_id", "story_id",
    "seed_file", "job", "error_kind", "lease_owner",
)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in FIXED_KEYS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{key}={record.__dict__[key]}" for key in FIXED_KEYS if key in record.__dict__
        )
        return f"{base} {extras}" if extras else base


def _not_a_skipped_run(record: logging.LogRecord) -> bool:
    """APScheduler warns when a run is skipped because the previous one is still working; with
    ``max_instances=1`` that is the design (a long classify run drains a backlog), not a fault."""
    return "maximum number of running instances reached" not in record.getMessage()


def setup_logging(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in (
        "httpx",
        "httpcore",
        "apscheduler.executors.default",
        "apscheduler.scheduler",  # "Adding job tentatively…": the runner lists the jobs itself
        "uvicorn.access",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    scheduler_log = logging.getLogger("apscheduler.scheduler")
    if root.level > logging.DEBUG:
        scheduler_log.addFilter(_not_a_skipped_run)
    else:
        scheduler_log.removeFilter(_not_a_skipped_run)
