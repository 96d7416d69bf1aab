from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from alerts.match import ArticleFacts, ClassFacts, rule_matches
from alerts.rules import (
    RulesError,
    RulesWatcher,
    default_rules_path,
    load_rules,
    parse_duration,
    parse_rules,
)
from service.cli import app
from tests.conftest import ServiceProcess


def errors_of(text: str, targets: list[str] | None = None) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml", targets)
    return info.value.errors


def test_shipped_default_rules_are_valid_and_cover_the_three_developments() -> None:
    rules = load_rules(default_rules_path(), targets=[])
    names = [r.name for r in rules]
    assert names == ["new-coalition-development", "us-role-change", "russian-response"]
    first = rules.get("new-coalition-development")
    assert first is not None and first.match.new_story is True and first.match.relevant is True
    assert set(first.match.topics_any) == {
        "reassurance_force", "security_guarantees", "coalition_diplomacy",
    }  # fmt: skip
    assert rules.rules[1].match.topics_any == ["us_involvement"]
    assert rules.rules[2].match.topics_any == ["russia_position"]
    assert all(r.targets is None for r in rules)  # every configured target


def test_misspelled_field_names_the_rule_the_path_and_a_suggestion() -> None:
    errors = errors_of(
        """
rules:
  - name: us-role
    match: {relevant: true, topic_any: [us_involvement]}
    grop_wait: 5m
"""
    )
    assert (
        "rule 'us-role' (rules[0]): match.topic_any: unknown field 'topic_any' "
        "(did you mean 'topics_any'?)" in errors
    )
    assert "rule 'us-role' (rules[0]): grop_wait: unknown field 'grop_wait' (did you mean " \
        "'group_wait'?)" in errors  # fmt: skip


def test_bad_duration_is_explained() -> None:
    errors = errors_of(
        """
rules:
  - name: ok-rule
    match: {relevant: true}
  - name: slow
    match: {relevant: true}
    group_wait: 5 minutes
    repeat_interval: -1h
"""
    )
    assert len(errors) == 2, errors
    assert errors[0].startswith("rule 'slow' (rules[1]): group_wait: invalid duration '5 minutes'")
    assert "like 30s, 5m, 6h" in errors[0]
    assert errors[1].startswith("rule 'slow' (rules[1]): repeat_interval: invalid duration '-1h'")


def test_unknown_target_is_an_error_with_the_configured_names() -> None:
    errors = errors_of(
        """
rules:
  - name: r1
    match: {relevant: true}
    targets: [newsroom-mail, slak]
""",
        targets=["newsroom-mail", "slack"],
    )
    assert errors == [
        "rule 'r1' (rules[0]): targets[1]: unknown target 'slak' (did you mean 'slack'?); "
        "configured: newsroom-mail, slack"
    ]
    none_configured = errors_of(
        "rules:\n  - name: r1\n    match: {relevant: true}\n    targets: [x]\n", targets=[]
    )
    assert "no targets are configured" in none_configured[0]


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of(
        """
rules:
  - match: {relevant: true}
  - name: topics
    match:
      topics_any: [reassurance_forces]
      stance_in: [hostile]
      keywords_any: [Kremlin, "/russ(ia/"]
      min_confidence: 1.5
    severity: urgent
    group_by: []
  - name: topics
    match: {}
"""
    )
    joined = "\n".join(errors)
    assert "rules[0]: name: required field is missing" in joined
    assert "rule 'topics' (rules[1]): match.topics_any[0]:" in joined
    assert "'reassurance_force'" in joined  # the allowed values are listed
    assert "rule 'topics' (rules[1]): match.stance_in[0]:" in joined
    assert "rule 'topics' (rules[1]): match.keywords_any[1]: invalid regular expression" in joined
    assert "rule 'topics' (rules[1]): match.min_confidence:" in joined
    assert "rule 'topics' (rules[1]): severity:" in joined
    assert "rule 'topics' (rules[1]): group_by: group_by needs 'story', 'rule' or both" in joined


def test_duplicate_names_yaml_errors_and_wrong_shapes() -> None:
    dup = errors_of("rules:\n  - {name: a, match: {}}\n  - {name: a, match: {}}\n")
    assert dup == ["rule 'a' (rules[1]): name: duplicate of rules[0]"]
    bad_yaml = errors_of("rules:\n  - name: a\n    match: {relevant: true\n")
    assert bad_yaml[0].startswith("line ") and "not valid YAML" in bad_yaml[0]
    assert errors_of("- name: a\n") == ["expected a mapping with a `rules:` list at the top"]
    top = errors_of("rule:\n  - name: a\n")
    assert top == [
        "rules: required field is missing",
        "rule: unknown field 'rule' (did you mean 'rules'?)",
    ]


def test_durations() -> None:
    assert parse_duration("30s") == timedelta(seconds=30)
    assert parse_duration("5m") == timedelta(minutes=5)
    assert parse_duration("6h") == timedelta(hours=6)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("2d") == timedelta(days=2)
    assert parse_duration(45) == timedelta(seconds=45)
    for bad in ("", "5", "5 minutes", "h", "1y", "-3s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _facts(title: str, text: str = "", **kw: Any) -> ArticleFacts:
    cls = ClassFacts(True, 0.9, ("russia_position",), {"russia_position": 0.7}, "critical", 0.6)
    base: dict[str, Any] = {"classification": cls, "language": "it"}
    base.update(kw)
    return ArticleFacts(1, title, text, datetime.now(UTC), **base)


def test_keywords_are_case_and_accent_insensitive_words_or_regexes() -> None:
    rules = parse_rules(
        """
rules:
  - name: kw
    match:
      keywords_any: [cremlino, "Stati Uniti", USA, "/garanzi[ae] di sicurezza/"]
""",
        "t",
    )
    rule = rules.rules[0]
    assert rule_matches(rule, _facts("Il CRÈMLINO risponde"))
    assert rule_matches(rule, _facts("x", "gli  stati\nuniti confermano"))
    assert rule_matches(rule, _facts("Le GARANZÍE di sicurezza per Kyiv"))
    assert rule_matches(rule, _facts("Gli USA frenano"))
    assert not rule_matches(rule, _facts("Materiale usato e riusato"))  # words, not substrings
    assert not rule_matches(rule, _facts("Roma", "Nessuna notizia"))


def test_match_conditions() -> None:
    rules = parse_rules(
        """
rules:
  - name: strict
    match:
      relevant: true
      topics_all: [russia_position]
      stance_in: [critical]
      min_confidence: 0.65
      languages: [it]
      feeds: [ANSA]
      new_story: true
      min_story_sources: 2
""",
        "t",
    )
    rule = rules.rules[0]
    good: dict[str, Any] = {"outlet": "ansa", "first_in_story": True, "story_sources": 3}
    assert not rule_matches(rule, _facts("t", **good))  # stance 0.6 < 0.65
    cls = ClassFacts(True, 0.9, ("russia_position",), {"russia_position": 0.7}, "critical", 0.7)
    assert rule_matches(rule, _facts("t", classification=cls, **good))
    assert not rule_matches(rule, _facts("t", classification=cls, **{**good, "language": "en"}))
    assert rule_matches(rule, _facts("t", classification=cls, **{**good, "language": "it-IT"}))
    assert not rule_matches(rule, _facts("t", classification=cls, **{**good, "outlet": "Reuters"}))
    assert not rule_matches(
        rule, _facts("t", classification=cls, **{**good, "first_in_story": False})
    )
    assert not rule_matches(rule, _facts("t", classification=cls, **{**good, "story_sources": 1}))
    assert not rule_matches(rule, _facts("t", classification=None, **good))
    weak = ClassFacts(True, 0.6, ("russia_position",), {"russia_position": 0.7}, "critical", 0.7)
    assert not rule_matches(rule, _facts("t", classification=weak, **good))  # relevance 0.6


def test_watcher_reloads_on_change_and_keeps_old_rules_on_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - {name: one, match: {relevant: true}}\n", encoding="utf-8")
    watcher = RulesWatcher(path, targets=[])
    assert [r.name for r in watcher.current()] == ["one"]

    def rewrite(text: str) -> None:
        path.write_text(text, encoding="utf-8")
        stamp = time.time() + 2  # a distinct mtime even on coarse file systems
        os.utime(path, (stamp, stamp))

    rewrite("rules:\n  - {name: one, match: {relevant: true}}\n  - {name: two, match: {}}\n")
    assert [r.name for r in watcher.current()] == ["one", "two"]
    rewrite("rules:\n  - {name: three, match: {relevnt: true}}\n")
    assert [r.name for r in watcher.current()] == ["one", "two"]  # kept
    assert watcher.last_error is not None
    assert "rule 'three' (rules[0]): match.relevnt: unknown field" in str(watcher.last_error)
    rewrite("rules:\n  - {name: four, match: {}}\n")
    assert [r.name for r in watcher.current()] == ["four"]
    assert watcher.last_error is None


def test_cli_check_prints_every_error_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("COALITION_WATCH_"):
            monkeypatch.delenv(key)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n  - name: a\n    match: {topics_any: [sanction]}\n    group_wait: soon\n"
        "    targets: [pager]\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    result = runner.invoke(app, ["alerts", "check", str(bad)])
    assert result.exit_code == 1, result.output
    assert "3 error(s)" in result.output
    assert "rule 'a' (rules[0]): match.topics_any[0]:" in result.output
    assert "rule 'a' (rules[0]): group_wait: invalid duration 'soon'" in result.output
    assert "rule 'a' (rules[0]): targets[0]: unknown target 'pager'" in result.output
    ok = runner.invoke(app, ["alerts", "check"])  # the shipped default
    assert ok.exit_code == 0, ok.output
    assert "3 rule(s), valid" in ok.output
    assert "new-coalition-development [warning] group_by=story group_wait=2m" in ok.output


def test_run_refuses_to_start_on_invalid_rules(service: ServiceProcess, tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: a\n    match: {keyword_any: [x]}\n", encoding="utf-8")
    service.env["COALITION_WATCH_ALERTS__RULES"] = str(bad)
    service.cli("db", "upgrade")
    proc = service.cli("run", check=False)
    assert proc.returncode == 2
    assert "invalid alert rules" in proc.stderr
    assert "rule 'a' (rules[0]): match.keyword_any: unknown field 'keyword_any' (did you mean " \
        "'keywords_any'?)" in proc.stderr  # fmt: skip
