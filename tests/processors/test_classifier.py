"""The real classifier (default encoder + the repository's heads) on seeds and fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collectors.seeds import parse_seed, seed_files
from processors.classifier import Classifier, evaluate_file
from processors.labelled import OFF_TOPIC, STANCES, SUBJECT_TOPICS, TOPICS, read_jsonl

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "classifier_eval.jsonl"


def _cli(*args: str, cwd: Path, model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    env.update(COALITION_WATCH_CLASSIFIER__MODEL_DIR=str(model_dir), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_five_seeds_are_relevant_with_sensible_topics(classifier: Classifier) -> None:
    seeds = [parse_seed(p) for p in seed_files(REPO / "seeds")]
    assert len(seeds) == 5
    _vectors, predictions = classifier.classify([f"{s.title}\n\n{s.text}" for s in seeds])
    for seed, p in zip(seeds, predictions, strict=True):
        assert p.relevant, (seed.name, p)
        assert p.relevance_score >= 0.9, (seed.name, p.relevance_score)
        assert p.topics and set(p.topics) <= set(SUBJECT_TOPICS), (seed.name, p.topics)
        # Every seed is about the coalition's planned reassurance force.
        assert "reassurance_force" in p.topics, (seed.name, p.topics)
        assert p.stance in STANCES


def test_hard_negatives_are_not_relevant(classifier: Classifier) -> None:
    items = [i for i in read_jsonl(FIXTURE) if not i.relevant]
    assert items
    _v, predictions = classifier.classify([i.document for i in items])
    for item, p in zip(items, predictions, strict=True):
        assert not p.relevant, item.id
        assert p.topics == [OFF_TOPIC] and p.stance == "neutral"


def test_evaluation_of_a_file(classifier: Classifier) -> None:
    report = evaluate_file(classifier, FIXTURE)
    assert report.n == 6
    assert report.relevance.f1 == 1.0
    assert report.articles_per_second is not None and report.articles_per_second > 0
    assert sum(map(sum, report.confusion)) == 6


def test_model_eval_json_prints_one_object_with_the_schema(e5_dir: Path, tmp_path: Path) -> None:
    out = _cli("model", "eval", str(FIXTURE), "--json", cwd=tmp_path, model_dir=e5_dir)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)  # exactly one JSON document on stdout
    assert report["n"] == 6
    assert set(report["relevance"]) >= {"precision", "recall", "f1"}
    assert set(report["topics"]) >= {"micro_f1", "macro_f1", "per_label"}
    assert set(report["topics"]["per_label"]) == set(TOPICS)
    for scores in report["topics"]["per_label"].values():
        assert set(scores) >= {"precision", "recall", "f1", "support"}
    assert set(report["stance"]) >= {"macro_f1", "accuracy"}
    assert report["articles_per_second"] > 0
    assert report["topics"]["per_label"]["off_topic"]["support"] == 2


def test_model_eval_text_has_the_tables(e5_dir: Path, tmp_path: Path) -> None:
    out = _cli("model", "eval", str(FIXTURE), cwd=tmp_path, model_dir=e5_dir)
    assert out.returncode == 0, out.stderr
    for needle in ("relevance", "micro-F1", "macro-F1", "confusion", "reassurance_force"):
        assert needle in out.stdout


@pytest.mark.parametrize(
    ("line", "culprit"),
    [
        ('{"id": "x", "title": "", "text": "t", "topics": [], "stance": "neutral"}', "relevant"),
        ('{"id": "x", "text": "t", "topics": ["war"], "stance": "neutral", "relevant": false}',
         "topics"),
        ("not json", "not valid JSON"),
    ],
)  # fmt: skip
def test_model_eval_names_the_bad_line(
    e5_dir: Path, tmp_path: Path, line: str, culprit: str
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text(encoding="utf-8").splitlines()[0] + "\n" + line + "\n")
    out = _cli("model", "eval", str(bad), "--json", cwd=tmp_path, model_dir=e5_dir)
    assert out.returncode == 1
    assert f"{bad}:2" in out.stderr and culprit in out.stderr
    assert out.stdout == ""
