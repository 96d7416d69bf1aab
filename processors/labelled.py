"""Labelled examples: the JSONL format read by training and by evaluation, and the label names.

One JSON object a line: ``id``, ``language``, ``title`` (may be empty), ``text``, ``topics``,
``stance``, ``relevant``; any other field (``why``, …) is ignored. A bad line fails with the file,
the line number and the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ValidationError, field_validator

Topic = Literal[
    "reassurance_force",
    "security_guarantees",
    "ceasefire_negotiations",
    "us_involvement",
    "military_aid",
    "russia_position",
    "coalition_diplomacy",
    "sanctions",
    "off_topic",
]
TOPICS: tuple[str, ...] = get_args(Topic)
OFF_TOPIC = "off_topic"
# Topics of a relevant article; a piece that is not relevant has exactly ["off_topic"].
SUBJECT_TOPICS: tuple[str, ...] = tuple(t for t in TOPICS if t != OFF_TOPIC)
STANCES: tuple[str, ...] = ("supportive", "critical", "neutral")
NEUTRAL = "neutral"

Stance = Literal["supportive", "critical", "neutral"]


class LabelledDataError(ValueError):
    """A labelled file cannot be read; the message names the file, the line and the field."""


class LabelledItem(BaseModel):
    model_config = {"extra": "ignore"}

    id: str
    language: str = ""
    title: str = ""
    text: str
    topics: list[Topic]
    stance: Stance
    relevant: bool

    @field_validator("title", "language", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object) -> object:
        return "" if value is None else value

    @field_validator("id", mode="before")
    @classmethod
    def _numeric_id(cls, value: object) -> object:
        # Files made elsewhere often number their items; a number is as good an id as a string.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def document(self) -> str:
        return article_text(self.title, self.text)


def article_text(title: str | None, text: str) -> str:
    """The text the encoder reads for an article: the title, a blank line, the body."""
    title = (title or "").strip()
    body = text.strip()
    return f"{title}\n\n{body}" if title else body


def read_jsonl(path: Path) -> list[LabelledItem]:
    items: list[LabelledItem] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                items.append(LabelledItem.model_validate(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise LabelledDataError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
            except ValidationError as exc:
                fields = "; ".join(
                    f"field {'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise LabelledDataError(f"{path}:{number}: {fields}") from exc
    return items


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of one split: ``<split>_*.jsonl`` in ``folder``, sorted by name."""
    return sorted(folder.glob(f"{split}_*.jsonl"))


def read_split(folder: Path, split: str) -> list[LabelledItem]:
    files = split_files(folder, split)
    if not files:
        raise LabelledDataError(f"no {split}_*.jsonl files in {folder}")
    items = [item for path in files for item in read_jsonl(path)]
    seen: dict[str, int] = {}
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
    duplicates = sorted(k for k, n in seen.items() if n > 1)
    if duplicates:
        raise LabelledDataError(f"{split} split in {folder}: duplicate ids {duplicates[:5]}")
    return items


def data_hash(items: Iterable[LabelledItem]) -> str:
    """A hash of the examples' content and labels (order-independent)."""
    rows = sorted(
        json.dumps(
            [i.id, i.title, i.text, sorted(i.topics), i.stance, i.relevant], ensure_ascii=False
        )
        for i in items
    )
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


def check_disjoint(train: Sequence[LabelledItem], dev: Sequence[LabelledItem]) -> None:
    """Training must never see the dev split: no shared id and no shared text."""
    shared_ids = {i.id for i in train} & {i.id for i in dev}
    shared_text = {i.text.strip() for i in train} & {i.text.strip() for i in dev}
    if shared_ids or shared_text:
        raise LabelledDataError(
            f"train and dev overlap: ids {sorted(shared_ids)[:5]}, {len(shared_text)} shared texts"
        )
