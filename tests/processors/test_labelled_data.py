"""The labelled data in the repository: its size and balance, its label rules, the dev split
kept apart, and the shipped heads trained on exactly this training split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from processors.classifier import PACKAGE_DATA_DIR, PACKAGE_HEADS_DIR
from processors.heads import Heads
from processors.labelled import (
    NEUTRAL,
    OFF_TOPIC,
    STANCES,
    SUBJECT_TOPICS,
    check_disjoint,
    data_hash,
    read_jsonl,
    read_split,
)

SEEDS = Path(__file__).resolve().parents[2] / "seeds"


def test_the_training_set_is_large_balanced_and_covers_every_label() -> None:
    train = read_split(PACKAGE_DATA_DIR, "train")
    dev = read_split(PACKAGE_DATA_DIR, "dev")
    check_disjoint(train, dev)
    assert len(train) >= 400 and len(dev) >= 100
    languages = Counter(i.language for i in train)
    assert set(languages) == {"it", "en"}, languages
    assert 0.4 <= languages["it"] / len(train) <= 0.6, languages
    topics: Counter[str] = Counter(t for i in train for t in i.topics)
    for topic in (*SUBJECT_TOPICS, OFF_TOPIC):
        assert topics[topic] >= 30, (topic, topics[topic])
    stances: Counter[str] = Counter(i.stance for i in train)
    for stance in STANCES:
        assert stances[stance] >= 80, (stance, stances[stance])
    # Long, real-length articles too, not only briefs.
    assert sum(len(i.text.split()) >= 350 for i in train) >= 100


def test_every_item_follows_the_label_rules() -> None:
    for split in ("train", "dev"):
        for item in read_split(PACKAGE_DATA_DIR, split):
            where = f"{split} {item.id}"
            assert item.text.strip(), where
            assert item.topics, where
            if item.relevant:
                assert OFF_TOPIC not in item.topics, where
                assert len(set(item.topics)) == len(item.topics), where
            else:
                assert item.topics == [OFF_TOPIC], where
                assert item.stance == NEUTRAL, where
            assert item.id.startswith(("seed-", f"{item.language}-")), where


def test_the_five_seeds_are_labelled_in_the_training_split() -> None:
    seeds = sorted(p.stem for p in SEEDS.glob("*.txt"))
    assert len(seeds) == 5
    ids = {i.id for i in read_split(PACKAGE_DATA_DIR, "train")}
    assert {f"seed-{name}" for name in seeds} <= ids


def test_the_shipped_heads_were_trained_on_this_training_split() -> None:
    meta = Heads.load(PACKAGE_HEADS_DIR).meta
    train = read_split(PACKAGE_DATA_DIR, "train")
    dev = read_split(PACKAGE_DATA_DIR, "dev")
    assert meta["training_data"]["sha256"] == data_hash(train), "run `coalition-watch model train`"
    assert meta["training_data"]["n"] == len(train)
    assert meta["dev_data"]["sha256"] == data_hash(dev)


def test_items_from_other_tools_are_read_as_they_come(tmp_path: Path) -> None:
    path = tmp_path / "external.jsonl"
    path.write_text(
        '{"id": 7, "language": null, "title": null, "text": "Testo.", "topics": ["sanctions"],'
        ' "stance": "neutral", "relevant": true, "url": "https://example.org/a", "why": "x"}\n',
        encoding="utf-8",
    )
    (item,) = read_jsonl(path)
    assert (item.id, item.language, item.title, item.document) == ("7", "", "", "Testo.")
