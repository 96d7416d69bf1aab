"""`coalition-watch run` classifies the seeds in its own classify job; the CLI commands work."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServiceProcess


def test_the_service_classifies_ingested_articles(service: ServiceProcess, e5_dir: Path) -> None:
    service.env["COALITION_WATCH_CLASSIFIER__MODEL_DIR"] = str(e5_dir)
    service.env["COALITION_WATCH_CLASSIFIER__INTERVAL"] = "2"
    service.cli("db", "upgrade")
    service.start()
    service.wait_http("/healthz")
    deadline = time.monotonic() + 180
    listed: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        listed = json.loads(service.cli("articles", "list", "--json").stdout)
        if len(listed) == 5 and all(a["status"] != "new" for a in listed):
            break
        # The model runs in a worker thread: the event loop keeps answering meanwhile.
        assert httpx.get(service.base + "/healthz", timeout=5).status_code == 200
        time.sleep(1)
    assert len(listed) == 5 and all(a["status"] != "new" for a in listed), listed
    body = httpx.get(service.base + "/metrics", timeout=5).text
    families = {f.name: f for f in text_string_to_metric_families(body)}
    classified = {
        s.labels["relevant"]: s.value
        for s in families["coalition_watch_articles_classified"].samples
        if s.name.endswith("_total")
    }
    assert classified.get("true") == 5
    pending = families["coalition_watch_articles_pending"].samples
    assert any(s.labels == {"stage": "classification"} and s.value == 0 for s in pending)
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=15) == 0

    stories = json.loads(service.cli("stories", "list", "--json").stdout)
    assert stories and sum(s["articles"] for s in stories) == 5
    again = service.cli("classify")
    assert again.stdout.startswith("0 classified, 0 reclassified"), again.stdout
    everything = service.cli("classify", "--all")
    assert "5 reclassified" in everything.stdout and "0 embedded" in everything.stdout
