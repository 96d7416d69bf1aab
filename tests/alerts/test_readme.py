"""The README's alert examples are real: the rules, the targets, the receiver's verify()."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from alerts.options import AlertOptions
from alerts.rules import parse_rules
from alerts.webhook import encode, sign
from tests.conftest import REPO


def section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n### {title}\n")
    end = text.find("\n### ", start + 1)
    return text[start:end]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_rules_and_targets_examples_load(tmp_path: Path) -> None:
    [toml_text] = blocks(section("Targets"), "toml")
    secret_file = tmp_path / "secret"
    secret_file.write_text("whsec_c2VjcmV0", encoding="utf-8")
    toml_text = toml_text.replace("/run/secrets/smtp-password", str(secret_file))
    toml_text = toml_text.replace("/run/secrets/webhook-secret", str(secret_file))
    options = AlertOptions.model_validate(tomllib.loads(toml_text)["alerts"])
    assert options.target_names == ["newsroom-mail", "ops-hook"]
    [yaml_text] = blocks(section("Rules"), "yaml")
    rules = parse_rules(yaml_text, "README", options.target_names)
    assert rules.rules[0].name == "new-coalition-development"


def test_readme_receiver_snippet_verifies_our_signature() -> None:
    [code] = blocks(section("Webhook body"), "python")
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    verify = namespace["verify"]
    import time

    body = encode({"id": "cw-1", "type": "alert.fired"})
    ts = int(time.time())
    for secret in ("whsec_c2VjcmV0IGtleSBieXRlcw==", "a plain secret"):
        headers = {
            "webhook-id": "cw-1",
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, "cw-1", ts, body),
        }
        verify(secret, headers, body)
        with pytest.raises(ValueError, match="bad signature"):
            verify(secret, headers, body.replace(b"fired", b"fixed"))
