from __future__ import annotations

import json
import signal
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServiceProcess


def test_service_serves_health_and_metrics_and_stops_on_sigterm(service: ServiceProcess) -> None:
    service.cli("db", "upgrade")
    service.start()
    service.wait_http("/healthz")
    service.wait_http("/readyz")
    # The seed job runs at start: the five seeds arrive without any manual ingest.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = json.loads(service.cli("articles", "list", "--json").stdout)
        if len(listed) == 5:
            break
        time.sleep(0.5)
    assert len(listed) == 5
    body = httpx.get(service.base + "/metrics", timeout=5).text
    families = {f.name: f for f in text_string_to_metric_families(body)}
    ingested = families["coalition_watch_entries_ingested"]
    added = sum(s.value for s in ingested.samples if s.labels.get("result") == "added")
    assert added == 5
    assert "coalition_watch_stage_last_success_timestamp_seconds" in families
    assert service.proc is not None
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 10


def test_service_refuses_to_run_without_schema(service: ServiceProcess) -> None:
    proc = service.cli("run", check=False)
    assert proc.returncode == 2
    assert "db upgrade" in proc.stderr
