"""Scores of predictions against labelled examples: relevance, topics, stance.

Relevance is scored as a binary task (positive = relevant). Topics are multi-label: per-label
precision/recall/F1/support, micro-F1 over all label decisions and macro-F1 as the mean over the
labels that occur in the gold data or the predictions. Stance is scored as three classes:
macro-F1, accuracy and the confusion matrix (rows gold, columns predicted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from processors.labelled import STANCES, TOPICS, LabelledItem


class Verdict(Protocol):
    @property
    def relevant(self) -> bool: ...

    @property
    def topics(self) -> list[str]: ...

    @property
    def stance(self) -> str: ...


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    support: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "support": self.support,
        }


def prf(tp: int, fp: int, fn: int) -> PRF:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return PRF(p, r, f, tp + fn)


@dataclass
class Report:
    n: int
    relevance: PRF
    topics: dict[str, PRF]
    topics_micro_f1: float
    topics_macro_f1: float
    stance: dict[str, PRF]
    stance_macro_f1: float
    stance_accuracy: float
    confusion: list[list[int]]  # rows: gold STANCES, columns: predicted STANCES
    articles_per_second: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "relevance": {
                "precision": round(self.relevance.precision, 4),
                "recall": round(self.relevance.recall, 4),
                "f1": round(self.relevance.f1, 4),
                "support": self.relevance.support,
            },
            "topics": {
                "micro_f1": round(self.topics_micro_f1, 4),
                "macro_f1": round(self.topics_macro_f1, 4),
                "per_label": {k: v.as_dict() for k, v in self.topics.items()},
            },
            "stance": {
                "macro_f1": round(self.stance_macro_f1, 4),
                "accuracy": round(self.stance_accuracy, 4),
                "per_label": {k: v.as_dict() for k, v in self.stance.items()},
                "labels": list(STANCES),
                "confusion": self.confusion,
            },
            "articles_per_second": (
                round(self.articles_per_second, 2) if self.articles_per_second is not None else None
            ),
            **self.extra,
        }

    def summary(self) -> dict[str, float]:
        return {
            "relevance_f1": round(self.relevance.f1, 4),
            "topics_micro_f1": round(self.topics_micro_f1, 4),
            "topics_macro_f1": round(self.topics_macro_f1, 4),
            "stance_macro_f1": round(self.stance_macro_f1, 4),
            "stance_accuracy": round(self.stance_accuracy, 4),
        }

    def render(self) -> str:
        lines = [f"{self.n} examples"]
        if self.articles_per_second is not None:
            lines[0] += f", {self.articles_per_second:.1f} articles/s"
        r = self.relevance
        lines += [
            "",
            f"relevance   precision {r.precision:.3f}  recall {r.recall:.3f}  "
            f"F1 {r.f1:.3f}  (support {r.support})",
            "",
            f"topics      micro-F1 {self.topics_micro_f1:.3f}  macro-F1 {self.topics_macro_f1:.3f}",
            f"  {'label':<24} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}",
        ]
        for label, s in self.topics.items():
            lines.append(
                f"  {label:<24} {s.precision:>9.3f} {s.recall:>7.3f} {s.f1:>6.3f} {s.support:>8}"
            )
        lines += [
            "",
            f"stance      macro-F1 {self.stance_macro_f1:.3f}  accuracy {self.stance_accuracy:.3f}",
            f"  {'label':<24} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}",
        ]
        for label, s in self.stance.items():
            lines.append(
                f"  {label:<24} {s.precision:>9.3f} {s.recall:>7.3f} {s.f1:>6.3f} {s.support:>8}"
            )
        lines += ["", "  confusion (rows gold, columns predicted)"]
        lines.append("  " + " " * 12 + "".join(f"{s:>12}" for s in STANCES))
        for gold, row in zip(STANCES, self.confusion, strict=True):
            lines.append(f"  {gold:<12}" + "".join(f"{v:>12}" for v in row))
        return "\n".join(lines)


def evaluate(
    gold: Sequence[LabelledItem],
    predicted: Sequence[Verdict],
    *,
    articles_per_second: float | None = None,
) -> Report:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold items but {len(predicted)} predictions")
    pairs = list(zip(gold, predicted, strict=True))
    tp = sum(1 for g, p in pairs if g.relevant and p.relevant)
    fp = sum(1 for g, p in pairs if not g.relevant and p.relevant)
    fn = sum(1 for g, p in pairs if g.relevant and not p.relevant)
    relevance = prf(tp, fp, fn)

    topics: dict[str, PRF] = {}
    micro = [0, 0, 0]
    used: list[float] = []
    for label in TOPICS:
        t = sum(1 for g, p in pairs if label in g.topics and label in p.topics)
        f_p = sum(1 for g, p in pairs if label not in g.topics and label in p.topics)
        f_n = sum(1 for g, p in pairs if label in g.topics and label not in p.topics)
        topics[label] = prf(t, f_p, f_n)
        micro[0] += t
        micro[1] += f_p
        micro[2] += f_n
        if t + f_p + f_n:
            used.append(topics[label].f1)
    micro_f1 = prf(*micro).f1
    macro_f1 = sum(used) / len(used) if used else 0.0

    index = {s: i for i, s in enumerate(STANCES)}
    confusion = [[0] * len(STANCES) for _ in STANCES]
    for g, p in pairs:
        confusion[index[g.stance]][index[p.stance]] += 1
    stance: dict[str, PRF] = {}
    for s, i in index.items():
        t = confusion[i][i]
        f_p = sum(confusion[j][i] for j in range(len(STANCES))) - t
        f_n = sum(confusion[i]) - t
        stance[s] = prf(t, f_p, f_n)
    stance_macro = sum(v.f1 for v in stance.values()) / len(stance)
    accuracy = sum(confusion[i][i] for i in range(len(STANCES))) / len(pairs) if pairs else 0.0
    return Report(
        n=len(pairs),
        relevance=relevance,
        topics=topics,
        topics_micro_f1=micro_f1,
        topics_macro_f1=macro_f1,
        stance=stance,
        stance_macro_f1=stance_macro,
        stance_accuracy=accuracy,
        confusion=confusion,
        articles_per_second=articles_per_second,
    )
