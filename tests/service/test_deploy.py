"""The deployment files: docker-compose.yml, the Dockerfile, deploy/ (Prometheus, Grafana,
systemd). Docker does not run here, so the compose file is parsed and every service, file, port
and variable it names is checked against the repository and the service's real settings and
metrics. Prometheus' own tools check the config and the rules, and a real Prometheus server
scrapes a real ``coalition-watch run``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from alerts.email import EmailOptions
from alerts.outbox import DEAD, RETRY, SENT
from alerts.rules import load_rules
from service.config import ENV_PREFIX, Settings, load_settings
from service.metrics import STAGES, Metrics
from tests.conftest import ServiceProcess, free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus.yml"
ALERTS_YML = DEPLOY / "alerts.yml"
ALERTS_TEST = REPO / "tests" / "data" / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "coalition-watch.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "coalition-watch.yml"
UNIT = DEPLOY / "coalition-watch.service"
README = REPO / "README.md"
JOB = "coalition-watch"
SERVICE = "coalition-watch"


# --- helpers ---------------------------------------------------------------------------------


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, for the forms the compose file may use."""

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        value = env.get(name)
        op, arg = m["op"], m["arg"] or ""
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return arg
        elif op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise KeyError(f"{name}: {arg}")
        elif op in (":+", "+"):
            present = value is not None and (op == "+" or value != "")
            return arg if present else ""
        return value or ""

    return _VAR.sub(sub, text)


def compose_variables() -> list[tuple[str, str | None]]:
    """Every ``${VAR...}`` of the compose file: (name, operator or None)."""
    text = "\n".join(
        line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    return [(m["braced"] or m["bare"], m["op"]) for m in _VAR.finditer(text) if not m["escaped"]]


REQUIRED_VARS_FOR_TEST = {"GRAFANA_ADMIN_PASSWORD": "test-password"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as compose reads it, with defaults (and test values for required ones)."""
    data = yaml.safe_load(interpolate(COMPOSE.read_text(), REQUIRED_VARS_FOR_TEST))
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (relative to the compose file) of each bind mount."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts[volume["target"]] = REPO / volume["source"]
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = REPO / source
    return mounts


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/")):
                out[source] = target
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a path inside the container comes from in the repo, through a bind mount."""
    target = PurePosixPath(container_path)
    for mount, source in sorted(bind_mounts(service).items(), key=lambda kv: -len(kv[0])):
        if target == PurePosixPath(mount) or PurePosixPath(mount) in target.parents:
            return source / target.relative_to(mount)
    return None


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port."""
    out: dict[int, int] = {}
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out[int(port["target"])] = int(port["published"])
            continue
        parts = str(port).split("/")[0].split(":")
        container = int(parts[-1])
        out[container] = int(parts[-2]) if len(parts) >= 2 else container
    return out


def command_flags(service: dict[str, Any]) -> dict[str, str]:
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    return dict(arg.lstrip("-").split("=", 1) for arg in command if "=" in arg)


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def setting_names() -> set[str]:
    """Every variable name a setting can be given by: COALITION_WATCH_A__B, nested by "__"."""

    def walk(model: type[BaseModel], prefix: str) -> Iterator[str]:
        for name, field in model.model_fields.items():
            for key in {name, field.alias or name}:
                var = prefix + key.upper()
                yield var
                annotation = field.annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    yield from walk(annotation, var + "__")

    names = set(walk(Settings, ENV_PREFIX))
    return names | {n + "_FILE" for n in names} | {ENV_PREFIX + "CONFIG"}


def settings_from_env(env: dict[str, str]) -> Settings:
    """Load settings as the service would with exactly these COALITION_WATCH_* variables."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    for key in saved:
        del os.environ[key]
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
        return load_settings(None)
    finally:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            del os.environ[key]
        os.environ.update(saved)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for word, rest in dockerfile_instructions():
        if word == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
    return args


def unit_directives() -> dict[str, dict[str, list[str]]]:
    """The systemd unit: section -> key -> every value (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{UNIT}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def tool(name: str) -> str:
    """A Prometheus tool from the Debian ``prometheus`` package; CI=true requires it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: install the Debian 'prometheus' package (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# --- the service's real metrics --------------------------------------------------------------


def exposition() -> str:
    """The service's /metrics text with one child per labelled metric, so every series shows."""
    metrics = Metrics()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*["x"] * len(value._labelnames))
    return generate_latest(metrics.registry).decode()


@pytest.fixture(scope="module")
def series_labels() -> dict[str, set[str]]:
    """Series name in the exposition -> its label names."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


TARGET_LABELS = {"job", "instance"}


def label_vocabulary() -> dict[tuple[str, str], set[str]]:
    """The values the service gives the labels that PromQL matches on literally."""
    stages = set(STAGES)
    return {
        ("coalition_watch_stage_last_success_timestamp_seconds", "stage"): stages,
        ("coalition_watch_stage_runs_total", "stage"): stages,
        ("coalition_watch_stage_runs_total", "outcome"): {"ok", "error"},
        ("coalition_watch_deliveries_total", "outcome"): {SENT, RETRY, DEAD},
        ("coalition_watch_articles_pending", "stage"): {"classification", "evaluation"},
        ("coalition_watch_feeds", "state"): {"enabled", "disabled", "unhealthy"},
        ("coalition_watch_entries_ingested_total", "source"): {"seed", "feed"},
        ("coalition_watch_entries_ingested_total", "result"): {"added", "updated"},
    }


_VALUE_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_METRIC = re.compile(r"\b(coalition_watch_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_problems(expr: str, series_labels: dict[str, set[str]]) -> list[str]:
    """Metric names and label names of ``expr`` that the service does not expose."""
    problems = []
    used: set[str] = set()
    for name, selector in _METRIC.findall(expr):
        if name not in series_labels:
            problems.append(f"unknown metric {name}")
            continue
        used |= series_labels[name]
        for label in _MATCHER.findall(selector or ""):
            if label not in series_labels[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
        for label, op, value in _VALUE_MATCHER.findall(selector or ""):
            known_values = label_vocabulary().get((name, label))
            if known_values is None or "$" in value:
                continue
            values = value.split("|") if op in ("=~", "!~") else [value]
            for v in values:
                if v not in known_values:
                    problems.append(f"{name}: {label}={v!r} is never set (known: {known_values})")
    known = used | TARGET_LABELS
    for group in _GROUPING.findall(expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            if label not in known:
                problems.append(f"no metric of the expression has label {label!r}")
    if "coalition_watch_" not in expr and not re.search(r"\bup\b", expr):
        problems.append("no coalition_watch_ metric")
    return problems


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every query: panel targets and query variables."""
    out = []
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target.get('refId')}", target.get("expr", "")))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS_YML.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    '"$job"': f'"{JOB}"',
    '"$instance"': '".*"',
}


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Grafana sends it."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unreplaced variable in {expr!r}"
    return expr


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_has_the_services_wired_by_dependencies(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    assert set(svcs) == {SERVICE, "postgres", "prometheus", "grafana", "mailpit"}
    for name, svc in svcs.items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        image = svc.get("image", "")
        tag = image.rsplit(":", 1)[1] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: image {image!r} is not pinned to a version"
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in svcs, f"{name} depends on unknown service {dep!r}"
        for volume in named_volumes(svc):
            assert volume in (compose.get("volumes") or {}), f"{name}: volume {volume} undeclared"
    app = svcs[SERVICE]
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(svcs["postgres"]["healthcheck"]["test"])
    postgres_env = env_of(svcs["postgres"])
    check = svcs["postgres"]["healthcheck"]["test"]
    assert check[check.index("-U") + 1] == postgres_env["POSTGRES_USER"]
    assert check[check.index("-d") + 1] == postgres_env["POSTGRES_DB"]
    # Non-root, as the image's own USER.
    user = str(app["user"]).split(":")[0]
    assert user not in ("0", "root")
    assert user == dockerfile_args()["APP_UID"]
    assert app["stop_signal"] == "SIGTERM"
    # Host ports are published once, on the loopback interface.
    host_ports = [p for svc in svcs.values() for p in published(svc).values()]
    assert len(host_ports) == len(set(host_ports))
    for svc in svcs.values():
        for port in svc.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{port} is published on every interface"


def test_compose_references_files_that_exist(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    build = svcs[SERVICE]["build"]
    context = REPO / build["context"]
    assert context.is_dir()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert set(build.get("args", {})) <= set(dockerfile_args())
    for name, svc in svcs.items():
        for target, source in bind_mounts(svc).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is not in the repo"
    # Every file the Dockerfile copies is in the build context and not excluded from it.
    ignored = [
        line.strip()
        for line in (context / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for word, rest in dockerfile_instructions():
        if word == "COPY":
            copied.extend(shlex.split(rest)[:-1])
    assert copied
    for item in copied:
        assert (context / item).exists(), f"Dockerfile copies missing {item}"
        assert item.rstrip("/") not in ignored, f".dockerignore excludes {item}"


def test_compose_ports_and_addresses_agree(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    app = svcs[SERVICE]
    # The settings the container runs with: its variables over the mounted config file.
    config_file = host_path(app, env_of(app)[ENV_PREFIX + "CONFIG"])
    assert config_file is not None and config_file.is_file()
    app_settings = settings_from_env({**env_of(app), ENV_PREFIX + "CONFIG": str(config_file)})
    # The service listens on all interfaces, on the port that is exposed and published.
    port = app_settings.http.port
    assert app_settings.http.host == "0.0.0.0"
    assert port in published(app)
    exposed = [
        int(p) for w, rest in dockerfile_instructions() if w == "EXPOSE" for p in rest.split()
    ]
    assert port in exposed
    assert int(dockerfile_env()["COALITION_WATCH_HTTP__PORT"]) == port

    # Prometheus scrapes it there, with the mounted config and rules.
    prometheus = svcs["prometheus"]
    flags = command_flags(prometheus)
    config_path = host_path(prometheus, flags["config.file"])
    assert config_path == PROMETHEUS_YML
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config_dir = PurePosixPath(flags["config.file"]).parent
    for rule_file in config["rule_files"]:
        in_container = config_dir / rule_file
        assert host_path(prometheus, str(in_container)) == ALERTS_YML
        assert (PROMETHEUS_YML.parent / rule_file).resolve() == ALERTS_YML
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs[JOB]["static_configs"] for t in sc["targets"]]
    assert targets == [f"{SERVICE}:{port}"]
    assert jobs[JOB].get("metrics_path", "/metrics") == "/metrics"
    prometheus_port = port_of(flags["web.listen-address"])
    assert prometheus_port in published(prometheus)
    assert host_path(prometheus, flags["storage.tsdb.path"]) is None
    assert flags["storage.tsdb.path"] in named_volumes(prometheus).values()

    # Grafana reads that Prometheus, and the dashboards from the mounted folder.
    grafana = svcs["grafana"]
    grafana_env = env_of(grafana)
    assert int(grafana_env.get("GF_SERVER_HTTP_PORT", "3000")) in published(grafana)
    assert host_path(grafana, "/etc/grafana/provisioning") == DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"]
    url = httpx.URL(datasources[0]["url"])
    assert (url.host, url.port) == ("prometheus", prometheus_port)
    assert datasources[0]["type"] == "prometheus"
    assert datasources[0]["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]
    provider = yaml.safe_load(GRAFANA_DASHBOARDS.read_text())["providers"][0]
    dashboards_dir = host_path(grafana, provider["options"]["path"])
    assert dashboards_dir is not None and (dashboards_dir / DASHBOARD.name).resolve() == DASHBOARD
    home = host_path(grafana, grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.resolve() == DASHBOARD

    # The database URL names the postgres service, its port, user, password and database.
    url_db = make_url(app_settings.database_url)
    postgres_env = env_of(svcs["postgres"])
    assert url_db.drivername == "postgresql+psycopg"
    assert url_db.host == "postgres"
    assert url_db.port == int(postgres_env.get("PGPORT", "5432"))
    assert url_db.username == postgres_env["POSTGRES_USER"]
    assert url_db.password == postgres_env["POSTGRES_PASSWORD"]
    assert url_db.database == postgres_env["POSTGRES_DB"]

    # Alert emails go to Mailpit's SMTP port; its UI is published.
    mailpit_env = env_of(svcs["mailpit"])
    smtp_port = port_of(mailpit_env.get("MP_SMTP_BIND_ADDR", "0.0.0.0:1025"))
    ui_port = port_of(mailpit_env.get("MP_UI_BIND_ADDR", "0.0.0.0:8025"))
    assert ui_port in published(svcs["mailpit"])
    emails = [t for t in app_settings.alerts.targets if t.kind == "email"]
    assert emails, f"{config_file}: no email target"
    for target in emails:
        assert isinstance(target, EmailOptions)
        assert (target.host, target.port) == ("mailpit", smtp_port)
        assert target.security == "none", "Mailpit has no TLS: plain SMTP"


def test_compose_variables_have_defaults_or_are_documented(compose: dict[str, Any]) -> None:
    readme = README.read_text()
    assert "## Deployment" in readme
    deployment = readme.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    variables = compose_variables()
    assert variables
    for name, op in variables:
        if op in (":-", "-"):
            continue
        assert f"`{name}`" in deployment, f"${{{name}}} has no default and is not in the README"
    # The README's variable table names only variables the compose file uses.
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", deployment, re.M))
    assert documented <= {name for name, _ in variables} | setting_names()


def test_every_coalition_watch_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = setting_names()
    sources: dict[str, dict[str, str]] = {
        "docker-compose.yml": env_of(services(compose)[SERVICE]),
        "Dockerfile": dockerfile_env(),
        UNIT.name: dict(
            v.split("=", 1) for v in unit_directives()["Service"].get("Environment", [])
        ),
    }
    for where, env in sources.items():
        ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        assert ours, where
        for key in ours:
            assert key in known, f"{where}: {key} is not a setting"
        without_config = {k: v for k, v in ours.items() if k != ENV_PREFIX + "CONFIG"}
        settings_from_env(without_config)  # the values are valid too


def test_compose_config_file_is_valid_settings() -> None:
    path = DEPLOY / "compose" / "coalition-watch.toml"
    settings = load_settings(path)
    assert [t.name for t in settings.alerts.targets] == ["mailpit"]
    # The rules the service would load accept these targets (run refuses unknown ones).
    load_rules(settings.alerts.rules_path(), settings.alerts.target_names)


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_the_model() -> None:
    steps = dockerfile_instructions()
    words = [w for w, _ in steps]
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [(i, rest) for i, (w, rest) in enumerate(steps) if w == "RUN"]

    def index_of(text: str) -> int:
        found = [i for i, rest in runs if text in rest]
        assert found, f"no RUN step with {text!r}"
        return found[0]

    user_at = words.index("USER")
    user = steps[user_at][1].split(":")[0]
    assert user not in ("root", "0")
    # torch (CPU build, the same pin as the Makefile) before the project, as root; the model
    # built afterwards as the service's user, so it lands in that user's cache.
    pin = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text())
    assert pin is not None
    assert dockerfile_args()["TORCH_VERSION"] == pin.group(1)
    assert index_of('"torch==${TORCH_VERSION}"') < index_of("pip install .") < user_at
    assert index_of("coalition-watch model build") > user_at
    assert "TORCH_INDEX_URL" in dockerfile_args() and dockerfile_args()["TORCH_INDEX_URL"] == ""
    env = dockerfile_env()
    assert env["COALITION_WATCH_HTTP__HOST"] == "0.0.0.0"
    health = next(rest for w, rest in steps if w == "HEALTHCHECK")
    assert "/healthz" in health and "curl" not in health
    cmd = json.loads(next(rest for w, rest in steps if w == "CMD"))
    script = cmd[-1]
    assert "coalition-watch db upgrade" in script and "exec coalition-watch run" in script
    assert script.index("db upgrade") < script.index("run")
    assert words.index("CMD") > user_at


def _healthcheck_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    health = next(rest for w, rest in dockerfile_instructions() if w == "HEALTHCHECK")
    image_cmd = json.loads(health.split("CMD", 1)[1])
    compose_cmd = services(compose)[SERVICE]["healthcheck"]["test"]
    assert compose_cmd[0] == "CMD"
    return {"Dockerfile": image_cmd, "docker-compose.yml": compose_cmd[1:]}


def test_healthchecks_probe_the_running_service(
    service: ServiceProcess, compose: dict[str, Any]
) -> None:
    """Both healthcheck commands, run as written, pass against the service and fail without it."""
    commands = _healthcheck_commands(compose)
    env = {**service.env, "COALITION_WATCH_HTTP__PORT": str(service.port)}

    def probe(cmd: list[str]) -> int:
        assert cmd[0] == "python"
        return subprocess.run(
            [sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30
        ).returncode

    service.cli("db", "upgrade")
    service.start()
    service.wait_http("/healthz")
    for where, cmd in commands.items():
        assert probe(cmd) == 0, f"{where} healthcheck fails against a healthy service"
    assert service.stop() == 0
    for where, cmd in commands.items():
        assert probe(cmd) != 0, f"{where} healthcheck passes with the service stopped"


# --- systemd ---------------------------------------------------------------------------------


def test_systemd_unit_is_hardened_and_runs_the_service() -> None:
    unit = unit_directives()
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["User"] and svc["User"] != "root"
    assert svc["WorkingDirectory"].startswith("/")
    assert "EnvironmentFile" in svc
    assert unit["Service"]["ExecStartPre"][0].endswith("coalition-watch db upgrade")
    assert svc["ExecStart"].endswith("coalition-watch run")
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    # The service exits within 10 s of SIGTERM; systemd waits longer before SIGKILL.
    assert int(svc["TimeoutStopSec"]) == 15
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert svc[key] == value, key
    # Everything the service writes is under ReadWritePaths.
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    settings = settings_from_env(env)
    writable = [Path(p) for p in svc["ReadWritePaths"].split()]
    db_file = Path(make_url(settings.database_url).database or "")
    for path in (settings.data_dir, db_file.parent, Path(env["HOME"])):
        assert any(path == w or w in path.parents for w in writable), f"{path} is read-only"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (systemd package): parsed checks only")
    # verify insists that the executables exist: point them at one that does.
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace("/opt/coalition-watch/.venv/bin/coalition-watch", "/bin/true")
    )
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 0 and not problems, "\n".join(problems)


# --- Grafana ---------------------------------------------------------------------------------


def test_dashboard_panels_all_have_queries_on_the_datasource_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert data["uid"] and data["title"]
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 12
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in panels:
        where = f"panel {panel['title']!r}"
        assert panel["datasource"]["uid"] == "${datasource}", where
        assert panel["targets"], f"{where} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{where} has an empty query"
            assert target["datasource"]["uid"] == "${datasource}", where
            assert 'job="$job"' in target["expr"], f"{where} ignores the job variable"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, where
    for name, var in variables.items():
        if var["type"] == "query":
            assert var["datasource"]["uid"] == "${datasource}", name
    # The brief's subjects each have a panel.
    text = " ".join(e for _, e in dashboard_queries())
    for metric in (
        "entries_ingested_total", "feed_polls_total", "feed_fetch_duration_seconds_bucket",
        "articles_pending", "stage_last_success_timestamp_seconds", "articles_by_topic_total",
        "articles_by_stance_total", "alerts_total", "deliveries_total", "deliveries_dead",
    ):  # fmt: skip
        assert "coalition_watch_" + metric in text, metric


def test_promql_uses_only_metrics_and_labels_the_service_exposes(
    series_labels: dict[str, set[str]],
) -> None:
    queries = dashboard_queries() + [(f"rule {r['alert']}", r["expr"]) for r in alert_rules()]
    problems = [
        f"{where}: {problem}"
        for where, expr in queries
        for problem in promql_problems(expr, series_labels)
    ]
    assert not problems, "\n".join(problems)
    # And the checker itself catches a misspelled metric and label.
    assert promql_problems("rate(coalition_watch_feed_poll_total[5m])", series_labels)
    assert promql_problems("sum by (kind) (coalition_watch_alerts_total)", series_labels)
    assert promql_problems('coalition_watch_deliveries_total{outcome="error"}', series_labels)
    assert promql_problems('coalition_watch_articles_pending{stage="classify"}', series_labels)


def test_alert_rules_have_summary_and_description() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    subjects = " ".join(r["expr"] for r in rules)
    for metric in (
        "stage_last_success_timestamp_seconds", "deliveries_total", "deliveries_dead",
        "delivery_oldest_pending_age_seconds", 'articles_pending{stage="classification"}',
        "feeds_unhealthy",
    ):  # fmt: skip
        assert "coalition_watch_" + metric in subjects, metric


# --- promtool ------------------------------------------------------------------------------


def test_promtool_checks_config_rules_and_metrics(tmp_path: Path) -> None:
    promtool = tool("promtool")

    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [promtool, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
        return output

    run("check", "config", str(PROMETHEUS_YML))
    run("check", "rules", str(ALERTS_YML))
    # The rules fire when they should, with the labels and annotations the tests state.
    assert "SUCCESS" in run("test", "rules", str(ALERTS_TEST))
    run("check", "metrics", stdin=exposition())


def test_promtool_rule_tests_fail_when_a_rule_is_wrong(tmp_path: Path) -> None:
    """The rule unit tests are not vacuous: a changed threshold makes them fail."""
    promtool = tool("promtool")
    broken = tmp_path / "deploy"
    broken.mkdir()
    text = ALERTS_YML.read_text()
    assert "> 1800" in text
    (broken / "alerts.yml").write_text(text.replace("> 1800", "> 7200"))
    tests_dir = tmp_path / "tests" / "data" / "prometheus"
    tests_dir.mkdir(parents=True)
    shutil.copy(ALERTS_TEST, tests_dir / ALERTS_TEST.name)
    proc = subprocess.run(
        [promtool, "test", "rules", str(tests_dir / ALERTS_TEST.name)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "CoalitionWatchStageStale" in proc.stdout + proc.stderr


# --- a real Prometheus ---------------------------------------------------------------------


@pytest.mark.slow
def test_real_prometheus_scrapes_the_service_and_loads_the_rules(
    service: ServiceProcess, tmp_path: Path
) -> None:
    prometheus = tool("prometheus")
    service.cli("db", "upgrade")
    service.start()
    service.wait_http("/healthz")

    # deploy/prometheus.yml, pointed at this service and this Prometheus, scraping every second.
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [
        str((PROMETHEUS_YML.parent / f).resolve()) for f in config["rule_files"]
    ]
    port = free_port()
    for job in config["scrape_configs"]:
        target = f"127.0.0.1:{service.port}" if job["job_name"] == JOB else f"127.0.0.1:{port}"
        job["static_configs"] = [{"targets": [target]}]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def query(expr: str) -> list[dict[str, Any]]:
            r = httpx.get(base + "/api/v1/query", params={"query": expr}, timeout=5)
            body = r.json()
            assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
            return list(body["data"]["result"])

        def wait_for(what: str, check: Any, timeout: float = 60) -> Any:
            deadline = time.monotonic() + timeout
            last: object = None
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"prometheus exited:\n{log.read_text()}")
                try:
                    result = check()
                    if result:
                        return result
                    last = result
                except (httpx.HTTPError, AssertionError) as exc:
                    last = exc
                time.sleep(0.5)
            raise AssertionError(f"{what} after {timeout}s ({last}):\n{log.read_text()}")

        wait_for("prometheus not ready", lambda: httpx.get(base + "/-/ready", timeout=2).is_success)

        def up() -> bool:
            result = query(f'up{{job="{JOB}"}}')
            return bool(result) and result[0]["value"][1] == "1"

        wait_for(f'up{{job="{JOB}"}} is not 1', up)

        # The rules of deploy/alerts.yml load and evaluate without errors.
        groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]

        def rules_healthy() -> bool:
            loaded = httpx.get(base + "/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [r for g in loaded for r in g["rules"]]
            bad = [r for r in rules if r["health"] == "err"]
            assert not bad, f"rules failing: {bad}"
            expected = sum(len(g["rules"]) for g in groups)
            return len(rules) == expected and all(r["health"] == "ok" for r in rules)

        wait_for("alert rules not evaluated", rules_healthy, timeout=30)

        # The service's own series arrive: the seed job ran at start.
        seeds_done = (
            f'coalition_watch_stage_last_success_timestamp_seconds{{stage="seeds", job="{JOB}"}}'
        )
        wait_for("no seeds stage timestamp", lambda: query(seeds_done))
        # Every dashboard query is valid PromQL for this Prometheus.
        for _where, expr in dashboard_queries():
            if expr.startswith("label_values("):
                continue
            query(as_promql(expr))
        assert query(as_promql('up{job="$job", instance=~"$instance"}'))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
