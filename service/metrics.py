"""Every metric of the service, in one registry, under the ``coalition_watch_`` namespace.

Labels are bounded: outcomes, stages, topic and stance names, rule names and target kinds come
from fixed vocabularies or the (small) configuration, never from URLs or article ids. Stages do
not import this module: they return results, and the service's jobs record them here.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NAMESPACE = "coalition_watch"

STAGES = ("seeds", "collect", "classify", "evaluate", "deliver", "retention")


class Metrics:
    """The metric catalogue. One instance per process (tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = NAMESPACE
        self.build_info = Gauge(
            "build_info", "Version of the running service.", ["version"], namespace=ns, registry=r
        )
        # Collection.
        self.feed_polls = Counter(
            "feed_polls", "Feed polls by outcome (ok, not_modified, error kinds).",
            ["outcome"], namespace=ns, registry=r,
        )  # fmt: skip
        self.fetch_duration = Histogram(
            "feed_fetch_duration_seconds", "Time to fetch one feed.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), namespace=ns, registry=r,
        )  # fmt: skip
        self.entries_ingested = Counter(
            "entries_ingested", "Articles stored by source and result (added, updated).",
            ["source", "result"], namespace=ns, registry=r,
        )  # fmt: skip
        self.feeds_total = Gauge(
            "feeds", "Feeds by state (enabled, disabled, unhealthy).", ["state"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.feeds_unhealthy = Gauge(
            "feeds_unhealthy", "Feeds past the consecutive-failure threshold.",
            namespace=ns, registry=r,
        )  # fmt: skip
        # Stage health.
        self.stage_last_success = Gauge(
            "stage_last_success_timestamp_seconds",
            "Unix time at which each stage's job last succeeded.", ["stage"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.stage_runs = Counter(
            "stage_runs", "Job runs by stage and outcome (ok, error).", ["stage", "outcome"],
            namespace=ns, registry=r,
        )  # fmt: skip
        # Backlog.
        self.articles_pending = Gauge(
            "articles_pending", "Articles waiting for a stage (classification, evaluation).",
            ["stage"], namespace=ns, registry=r,
        )  # fmt: skip
        # Classification.
        self.classify_duration = Histogram(
            "classification_batch_duration_seconds", "Time to classify one batch.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), namespace=ns, registry=r,
        )  # fmt: skip
        self.classify_batch_size = Histogram(
            "classification_batch_size", "Articles per classification batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), namespace=ns, registry=r,
        )  # fmt: skip
        self.articles_classified = Counter(
            "articles_classified", "Articles classified, by relevance.", ["relevant"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.articles_by_topic = Counter(
            "articles_by_topic", "Classified articles per topic label.", ["topic"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.articles_by_stance = Counter(
            "articles_by_stance", "Relevant classified articles per stance.", ["stance"],
            namespace=ns, registry=r,
        )  # fmt: skip
        # Alerts and delivery.
        self.alerts_fired = Counter(
            "alerts", "Alert notifications created, by rule.", ["rule"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.deliveries = Counter(
            "deliveries", "Delivery attempts by target kind and outcome.",
            ["kind", "outcome"], namespace=ns, registry=r,
        )  # fmt: skip
        self.dead_letters = Gauge(
            "deliveries_dead", "Deliveries dead-lettered (stored, not sent).",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.oldest_pending_delivery = Gauge(
            "delivery_oldest_pending_age_seconds", "Age of the oldest pending delivery.",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.alert_rules = Gauge(
            "alert_rules", "Alert rules loaded and in use.", namespace=ns, registry=r,
        )  # fmt: skip
        self.alert_rules_reload_failing = Gauge(
            "alert_rules_reload_failing",
            "1 while the rules file on disk is invalid (the previous rules stay in use).",
            namespace=ns, registry=r,
        )  # fmt: skip
        for stage in STAGES:
            self.stage_runs.labels(stage, "ok")
            self.stage_runs.labels(stage, "error")

    def stage_succeeded(self, stage: str) -> None:
        self.stage_runs.labels(stage, "ok").inc()
        self.stage_last_success.labels(stage).set(time.time())

    def stage_failed(self, stage: str) -> None:
        self.stage_runs.labels(stage, "error").inc()
