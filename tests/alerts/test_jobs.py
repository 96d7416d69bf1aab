"""The service's alert jobs, in process: the flow, the metrics, rule reloads."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import load_settings
from service.context import AppContext, build_context
from service.jobs import AlertJobs, job_specs, run_deliver, run_evaluate
from tests.alerts.conftest import (
    RULES,
    SECRET,
    Clock,
    WebhookReceiver,
    add_article,
    add_story,
)


@pytest.fixture
def ctx(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> Iterator[AppContext]:
    for key in list(os.environ):
        if key.startswith("COALITION_WATCH_"):
            monkeypatch.delenv(key)
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    receiver = WebhookReceiver(script=[500, 404])
    settings = load_settings(
        database_url=db_url,
        alerts={
            "rules": str(rules),
            "targets": [
                {"name": "hook", "kind": "webhook", "url": receiver.url, "secret": SECRET},
            ],
        },
    )
    context = build_context(settings)
    context.clock = clock
    context.instance_id = "jobs-test"
    yield context
    context.close()
    receiver.close()


def sample(ctx: AppContext, name: str, **labels: str) -> float:
    value = ctx.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_jobs_run_the_flow_and_record_metrics(ctx: AppContext, clock: Clock) -> None:
    names = [s.name for s in job_specs(ctx)]
    assert "evaluate" in names and "deliver" in names
    alerts = AlertJobs.from_settings(ctx)
    story = add_story(ctx.sessions, "s")
    for _ in range(3):
        add_article(ctx.sessions, story_id=story)
    add_article(ctx.sessions, story_id=add_story(ctx.sessions, "t"))
    result = run_evaluate(ctx, alerts)
    assert result.articles == 4 and result.opened == {"coalition": 2}
    assert sample(ctx, "coalition_watch_articles_pending", stage="evaluation") == 0
    assert sample(ctx, "coalition_watch_alert_rules") == 1
    clock.advance(minutes=2)
    delivered = run_deliver(ctx, alerts)  # the receiver answers 500, then 404
    assert delivered.outcomes == {("webhook", "retry"): 1, ("webhook", "dead"): 1}
    assert sample(ctx, "coalition_watch_alerts_total", rule="coalition") == 2
    assert sample(ctx, "coalition_watch_deliveries_total", kind="webhook", outcome="retry") == 1
    assert sample(ctx, "coalition_watch_deliveries_total", kind="webhook", outcome="dead") == 1
    assert sample(ctx, "coalition_watch_deliveries_dead") == 1
    assert sample(ctx, "coalition_watch_delivery_oldest_pending_age_seconds") == 0
    clock.advance(seconds=20)  # not yet due again (backoff ≥ 24 s): only the age grows
    run_deliver(ctx, alerts)
    assert sample(ctx, "coalition_watch_delivery_oldest_pending_age_seconds") == 20
    clock.advance(seconds=30)
    assert run_deliver(ctx, alerts).outcomes == {("webhook", "sent"): 1}
    assert sample(ctx, "coalition_watch_delivery_oldest_pending_age_seconds") == 0


def test_rules_reload_keeps_the_old_rules_when_the_new_file_is_invalid(
    ctx: AppContext, clock: Clock
) -> None:
    alerts = AlertJobs.from_settings(ctx)
    path = ctx.settings.alerts.rules_path()

    def rewrite(text: str) -> None:
        path.write_text(text, encoding="utf-8")
        stamp = time.time() + 5
        os.utime(path, (stamp, stamp))

    rewrite(RULES.replace("min_confidence: 0.5", "min_confidense: 0.5"))
    add_article(ctx.sessions)
    result = run_evaluate(ctx, alerts)
    assert result.matches == {"coalition": 1}  # the old rule still works
    assert sample(ctx, "coalition_watch_alert_rules_reload_failing") == 1
    rewrite(RULES.replace("name: coalition", "name: renamed"))
    add_article(ctx.sessions)
    assert run_evaluate(ctx, alerts).matches == {"renamed": 1}
    assert sample(ctx, "coalition_watch_alert_rules_reload_failing") == 0
