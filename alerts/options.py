"""The ``alerts`` settings section: where the rules are, the targets, timers and retries."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from alerts.notifiers import Notifier, NotifierDeps, TargetOptions, build_notifier, parse_target
from alerts.outbox import RetryPolicy
from alerts.rules import Duration, default_rules_path


class RetryOptions(BaseModel):
    """Backoff with jitter: ``initial`` doubling up to ``max``; dead-lettered after ``max_age``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: Duration = timedelta(seconds=30)
    max: Duration = timedelta(hours=1)
    max_age: Duration = timedelta(hours=24)
    jitter: float = Field(default=0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _order(self) -> RetryOptions:
        if self.initial.total_seconds() <= 0:
            raise ValueError("retry.initial must be positive")
        if self.max < self.initial:
            raise ValueError("retry.max must be at least retry.initial")
        return self


class AlertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Not "rules_file": a setting whose variable ends in _FILE is read as a secret file.
    rules: Path | None = Field(
        default=None, description="YAML rules file; empty: the shipped alerts/default_rules.yaml"
    )
    targets: list[SerializeAsAny[TargetOptions]] = Field(default_factory=list)
    evaluate_interval: float = Field(default=5.0, gt=0, description="seconds between runs")
    deliver_interval: float = Field(default=5.0, gt=0, description="seconds between runs")
    batch_size: int = Field(default=100, ge=1, le=10_000)
    lease: Duration = timedelta(minutes=5)
    max_concurrent_sends: int = Field(default=8, ge=1, le=256)
    retry: RetryOptions = RetryOptions()

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        parsed = [parse_target(item, i) for i, item in enumerate(value)]
        names = [t.name for t in parsed]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique: {', '.join(dupes)} repeated")
        return parsed

    @model_validator(mode="after")
    def _lease(self) -> AlertOptions:
        slowest = max(
            (getattr(t, "timeout", timedelta(0)) for t in self.targets), default=timedelta(0)
        )
        if self.lease <= slowest:
            raise ValueError(
                f"alerts.lease ({self.lease}) must exceed the slowest target timeout ({slowest})"
            )
        return self

    def rules_path(self) -> Path:
        return self.rules if self.rules is not None else default_rules_path()

    def retry_policy(self) -> RetryPolicy:
        r = self.retry
        return RetryPolicy(initial=r.initial, max=r.max, max_age=r.max_age, jitter=r.jitter)

    def notifiers(self, deps: NotifierDeps) -> dict[str, Notifier]:
        return {t.name: build_notifier(t, deps) for t in self.targets}

    def target(self, name: str) -> TargetOptions | None:
        return next((t for t in self.targets if t.name == name), None)

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]
