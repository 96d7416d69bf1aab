from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from processors.classifier import (
    PACKAGE_DATA_DIR,
    PACKAGE_HEADS_DIR,
    Classifier,
    ClassifierOptions,
    load_classifier,
    model_version,
    train,
)
from processors.heads import Heads, HeadsError, TrainingConfig, train_heads
from processors.labelled import (
    OFF_TOPIC,
    STANCES,
    SUBJECT_TOPICS,
    TOPICS,
    LabelledItem,
    read_jsonl,
)


def _synthetic(n: int = 90, dim: int = 48, seed: int = 3) -> tuple[np.ndarray, list[LabelledItem]]:
    """Vectors with a direction per label, so the heads have something real to learn."""
    rng = np.random.default_rng(seed)
    directions = {name: rng.normal(size=dim) for name in (*SUBJECT_TOPICS, *STANCES, "rel", "it")}
    items, rows = [], []
    for i in range(n):
        relevant = i % 4 != 0
        pair = [SUBJECT_TOPICS[i % 8], SUBJECT_TOPICS[(i * 3 + 1) % 8]]
        topics = pair if relevant else [OFF_TOPIC]
        stance = STANCES[i % 3] if relevant else "neutral"
        language = "it" if i % 2 else "en"
        v = rng.normal(scale=0.3, size=dim) + (directions["rel"] * (1 if relevant else -1))
        for t in topics:
            if t != OFF_TOPIC:
                v += directions[t]
        v += directions[stance] + (directions["it"] if language == "it" else 0)
        rows.append(v / np.linalg.norm(v))
        item = LabelledItem(
            id=f"s{i}", language=language, title="", text=f"t{i}", topics=topics,
            stance=stance, relevant=relevant,
        )  # fmt: skip
        items.append(item)
    return np.stack(rows).astype(np.float32), items


def test_train_save_load_predict_round_trip(tmp_path: Path) -> None:
    x, items = _synthetic()
    heads = train_heads(
        x, items, encoder="enc-a", config=TrainingConfig(l2_grid=(1e-2, 1e-1), folds=3)
    )
    heads.save(tmp_path)
    loaded = Heads.load(tmp_path)
    assert loaded.digest == heads.digest
    assert model_version("enc-a", loaded) == model_version("enc-a", heads)
    before, after = heads.predict(x), loaded.predict(x)
    assert [(p.relevant, p.topics, p.stance) for p in before] == [
        (p.relevant, p.topics, p.stance) for p in after
    ]
    for p in after:
        assert p.stance in STANCES and set(p.topics) <= set(TOPICS)
        assert set(p.topic_scores) == set(TOPICS) and set(p.stance_scores) == set(STANCES)
        if p.relevant:
            assert p.topics and OFF_TOPIC not in p.topics
        else:
            assert p.topics == [OFF_TOPIC] and p.stance == "neutral"
    # The heads learned the planted structure.
    gold = [(i.relevant, i.stance) for i in items]
    assert np.mean([(p.relevant, p.stance) == g for p, g in zip(after, gold, strict=True)]) > 0.9
    meta = json.loads((tmp_path / "heads.json").read_text())
    assert meta["encoder"] == "enc-a" and meta["topic_labels"] == list(SUBJECT_TOPICS)
    assert meta["heads_sha256"] == heads.digest
    assert len(meta["thresholds"]) == len(SUBJECT_TOPICS)


def test_model_version_changes_with_the_heads(tmp_path: Path) -> None:
    x, items = _synthetic()
    heads = train_heads(x, items, encoder="enc-a", config=TrainingConfig(l2_grid=(1e-2,), folds=3))
    first = model_version("enc-a", heads)
    heads.thresholds = heads.thresholds + 0.05
    assert model_version("enc-a", heads) != first
    assert model_version("enc-b", heads) != model_version("enc-a", heads)
    assert len(model_version("/very/long/" + "x" * 300, heads)) <= 128


def test_missing_or_malformed_heads_are_named(tmp_path: Path) -> None:
    with pytest.raises(HeadsError, match="model train"):
        Heads.load(tmp_path)
    shutil.copy(PACKAGE_HEADS_DIR / "heads.safetensors", tmp_path / "heads.safetensors")
    (tmp_path / "heads.json").write_text('{"format": 1}')
    with pytest.raises(HeadsError, match=str(tmp_path)):
        Heads.load(tmp_path)


def test_repository_heads_carry_their_provenance() -> None:
    heads = Heads.load(PACKAGE_HEADS_DIR)
    assert heads.encoder == "multilingual-e5-small"
    assert heads.topic_labels == SUBJECT_TOPICS and heads.stance_labels == STANCES
    assert len(heads.meta["training_data"]["sha256"]) == 64
    dev = heads.meta["dev_metrics"]
    assert dev["relevance_f1"] >= 0.90
    assert dev["topics_micro_f1"] >= 0.80
    assert dev["stance_macro_f1"] >= 0.75


def test_train_command_path_with_the_real_encoder(
    tmp_path: Path, classifier_options: ClassifierOptions
) -> None:
    """`model train` end to end on a slice of the labelled data, into a temporary folder."""
    data = tmp_path / "data"
    data.mkdir()
    for split, keep in (("train", 30), ("dev", 4)):
        for path in sorted(PACKAGE_DATA_DIR.glob(f"{split}_*.jsonl")):
            lines = path.read_text(encoding="utf-8").splitlines()[:keep]
            (data / path.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "heads"
    result = train(
        classifier_options, data_dir=data, out_dir=out, check_bf16=False,
        config=TrainingConfig(l2_grid=(1e-2,), folds=3),
    )  # fmt: skip
    assert result.dev is not None
    assert result.dev.n == sum(len(read_jsonl(p)) for p in data.glob("dev_*.jsonl"))
    options = classifier_options.model_copy(update={"heads_dir": out})
    trained = load_classifier(options)
    assert isinstance(trained, Classifier)
    assert trained.model_version == result.model_version
    assert trained.model_version.startswith("multilingual-e5-small+")
    meta = json.loads((out / "heads.json").read_text())
    assert meta["training_data"]["n"] == sum(len(read_jsonl(p)) for p in data.glob("train_*.jsonl"))
    assert set(meta["dev_metrics"]) >= {"relevance_f1", "topics_micro_f1", "stance_macro_f1"}
    assert meta["precision_check"]["bf16_checked"] is False


def test_heads_trained_for_another_encoder_are_refused(
    classifier_options: ClassifierOptions,
) -> None:
    options = classifier_options.model_copy(update={"encoder": "intfloat/other-model"})
    with pytest.raises(HeadsError, match="intfloat/other-model"):
        load_classifier(options)
