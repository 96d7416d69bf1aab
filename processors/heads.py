"""The trained heads on top of the sentence vectors: relevance, topics, stance.

Every head is a linear model on the standardized sentence vector (L2-regularized logistic
regression, fitted with L-BFGS in float64):

- relevance: binary;
- topics: one-vs-rest over the subject topics, trained on relevant examples, each label with its
  own threshold tuned on out-of-fold predictions of the training split; a relevant article gets
  at least its best topic, an article that is not relevant gets exactly ``off_topic``;
- stance: three classes with balanced class weights; an article that is not relevant is neutral.

The regularization strength of each head is chosen by k-fold cross-validation on the training
split alone. Heads are saved as ``heads.safetensors`` (the arrays) and ``heads.json`` (label
names, thresholds, encoder id, training-data hash, metrics); their hash, with the encoder id,
makes the ``model_version`` stored with every classification.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from processors.labelled import NEUTRAL, OFF_TOPIC, STANCES, SUBJECT_TOPICS, LabelledItem

HEADS_FORMAT = 1
ARRAYS_FILE = "heads.safetensors"
META_FILE = "heads.json"
DEFAULT_L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
THRESHOLD_GRID = tuple(round(0.15 + 0.05 * i, 2) for i in range(15))  # 0.15 … 0.85


class HeadsError(Exception):
    """Heads files are missing, malformed, or do not fit the encoder."""


@dataclass(frozen=True)
class Prediction:
    relevant: bool
    relevance_score: float
    topics: list[str]
    topic_scores: dict[str, float]
    stance: str
    stance_score: float
    stance_scores: dict[str, float]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -60, 60))))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


@dataclass
class Heads:
    encoder: str
    dim: int
    mean: np.ndarray  # (D,)
    scale: float
    relevance_w: np.ndarray  # (D,)
    relevance_b: float
    topics_w: np.ndarray  # (T, D)
    topics_b: np.ndarray  # (T,)
    thresholds: np.ndarray  # (T,)
    stance_w: np.ndarray  # (3, D)
    stance_b: np.ndarray  # (3,)
    story_axis: np.ndarray  # (D,) unit language direction (zeros: none), see story_vectors
    topic_labels: tuple[str, ...] = SUBJECT_TOPICS
    stance_labels: tuple[str, ...] = STANCES
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ inference

    def _features(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise HeadsError(f"heads expect {self.dim}-dim vectors, got shape {x.shape}")
        return (x - self.mean) / self.scale

    def scores(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Relevance probabilities (N,), topic probabilities (N, T), stance probabilities (N, 3)."""
        z = self._features(vectors)
        rel = _sigmoid(z @ self.relevance_w + self.relevance_b)
        top = _sigmoid(z @ self.topics_w.T + self.topics_b)
        st = _softmax(z @ self.stance_w.T + self.stance_b)
        return rel, top, st

    def story_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors for story clustering: centred on the training mean, with the direction that
        separates the languages removed, L2-normalized.

        Raw E5 vectors of two reports of one event in Italian and English are less alike than
        two different events in one language (both sides around 0.87 cosine); once the shared
        mean and the language direction are gone, reports of one event stay close (>= 0.5)
        and different events fall apart (<= 0.2) on the story fixture.
        """
        z = np.asarray(vectors, dtype=np.float64) - self.mean
        z = z - np.outer(z @ self.story_axis, self.story_axis)
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return np.asarray(z / np.maximum(norms, 1e-12), dtype=np.float32)

    def predict(self, vectors: np.ndarray) -> list[Prediction]:
        rel, top, st = self.scores(vectors)
        return [self._decide(float(r), t, s) for r, t, s in zip(rel, top, st, strict=True)]

    def _decide(self, rel: float, top: np.ndarray, st: np.ndarray) -> Prediction:
        relevant = rel >= 0.5
        topic_scores = {
            label: round(float(p), 4) for label, p in zip(self.topic_labels, top, strict=True)
        }
        topic_scores[OFF_TOPIC] = round(1.0 - rel, 4)
        stance_scores = {
            label: round(float(p), 4) for label, p in zip(self.stance_labels, st, strict=True)
        }
        if relevant:
            chosen = [
                label
                for label, p, thr in zip(self.topic_labels, top, self.thresholds, strict=True)
                if p >= thr
            ]
            if not chosen:  # a relevant article is about something: its best topic
                chosen = [self.topic_labels[int(np.argmax(top / self.thresholds))]]
            k = int(np.argmax(st))
            stance, stance_score = self.stance_labels[k], float(st[k])
        else:
            chosen = [OFF_TOPIC]
            neutral = self.stance_labels.index(NEUTRAL)
            stance, stance_score = NEUTRAL, max(float(st[neutral]), 1.0 - rel)
        return Prediction(
            relevant=relevant,
            relevance_score=round(rel, 4),
            topics=chosen,
            topic_scores=topic_scores,
            stance=stance,
            stance_score=round(stance_score, 4),
            stance_scores=stance_scores,
        )

    # ------------------------------------------------------------------ files

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32),
            "scale": np.array([self.scale], dtype=np.float32),
            "relevance.weight": self.relevance_w.astype(np.float32),
            "relevance.bias": np.array([self.relevance_b], dtype=np.float32),
            "topics.weight": self.topics_w.astype(np.float32),
            "topics.bias": self.topics_b.astype(np.float32),
            "stance.weight": self.stance_w.astype(np.float32),
            "stance.bias": self.stance_b.astype(np.float32),
            "story.axis": self.story_axis.astype(np.float32),
        }

    def inference_spec(self) -> dict[str, Any]:
        """Everything besides the arrays that changes a prediction (part of the hash)."""
        return {
            "format": HEADS_FORMAT,
            "encoder": self.encoder,
            "dim": self.dim,
            "topic_labels": list(self.topic_labels),
            "thresholds": [round(float(t), 4) for t in self.thresholds],
            "stance_labels": list(self.stance_labels),
        }

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.inference_spec(), sort_keys=True).encode())
        for name, arr in sorted(self.arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        arrays_tmp = folder / (ARRAYS_FILE + ".tmp")
        meta_tmp = folder / (META_FILE + ".tmp")
        save_file(self.arrays(), str(arrays_tmp), metadata={"heads_sha256": self.digest})
        meta = {**self.inference_spec(), "heads_sha256": self.digest, **self.meta}
        meta_tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for tmp in (arrays_tmp, meta_tmp):  # safetensors writes owner-only files
            tmp.chmod(0o666 & ~umask)
        arrays_tmp.replace(folder / ARRAYS_FILE)
        meta_tmp.replace(folder / META_FILE)

    @classmethod
    def load(cls, folder: Path) -> Heads:
        from safetensors.numpy import load_file

        arrays_path, meta_path = folder / ARRAYS_FILE, folder / META_FILE
        if not arrays_path.is_file() or not meta_path.is_file():
            raise HeadsError(
                f"no trained heads in {folder} (expected {ARRAYS_FILE} and {META_FILE}): "
                "run `coalition-watch model train`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            a = load_file(str(arrays_path))
            if meta.get("format") != HEADS_FORMAT:
                raise HeadsError(
                    f"{meta_path}: format {meta.get('format')}, {HEADS_FORMAT} expected"
                )
            spec_keys = {"format", "encoder", "dim", "topic_labels", "thresholds", "stance_labels"}
            heads = cls(
                encoder=str(meta["encoder"]),
                dim=int(meta["dim"]),
                mean=a["mean"].astype(np.float64),
                scale=float(a["scale"][0]),
                relevance_w=a["relevance.weight"].astype(np.float64),
                relevance_b=float(a["relevance.bias"][0]),
                topics_w=a["topics.weight"].astype(np.float64),
                topics_b=a["topics.bias"].astype(np.float64),
                thresholds=np.array(meta["thresholds"], dtype=np.float64),
                stance_w=a["stance.weight"].astype(np.float64),
                stance_b=a["stance.bias"].astype(np.float64),
                story_axis=a["story.axis"].astype(np.float64),
                topic_labels=tuple(meta["topic_labels"]),
                stance_labels=tuple(meta["stance_labels"]),
                meta={k: v for k, v in meta.items() if k not in spec_keys | {"heads_sha256"}},
            )
        except HeadsError:
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise HeadsError(f"heads in {folder} are malformed: {exc!r}") from exc
        if heads.topics_w.shape != (len(heads.topic_labels), heads.dim) or heads.stance_w.shape != (
            len(heads.stance_labels),
            heads.dim,
        ):
            raise HeadsError(f"heads in {folder}: array shapes do not match the label lists")
        if set(heads.topic_labels) != set(SUBJECT_TOPICS) or set(heads.stance_labels) != set(
            STANCES
        ):
            raise HeadsError(f"heads in {folder} use labels other than DESIGN.md's")
        return heads


# ---------------------------------------------------------------------------- training


def _fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    *,
    multiclass: bool,
    class_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """L2-regularized logistic regression; returns W (K, D) and b (K,)."""
    import torch

    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    n, d = X.shape
    if multiclass:
        target = torch.from_numpy(np.asarray(y, dtype=np.int64))
        k = len(class_weight) if class_weight is not None else int(target.max()) + 1
        weight = torch.from_numpy(class_weight) if class_weight is not None else None
    else:
        target_f = torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(n, -1))
        k = target_f.shape[1]
    W = torch.zeros(d, k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b], lr=1.0, max_iter=300, tolerance_grad=1e-8, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = X @ W + b
        if multiclass:
            loss = torch.nn.functional.cross_entropy(z, target, weight=weight)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, target_f)
        loss = loss + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy().T.copy(), b.detach().numpy().copy()


def _f1(gold: np.ndarray, pred: np.ndarray) -> float:
    tp = float(np.sum(gold & pred))
    fp = float(np.sum(~gold & pred))
    fn = float(np.sum(gold & ~pred))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _macro_f1(gold: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(np.mean([_f1(gold == c, pred == c) for c in range(k)]))


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def _balanced(labels: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return np.asarray(len(labels) / (k * np.maximum(counts, 1.0)))


def _topic_decisions(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    chosen = probs >= thresholds
    empty = ~chosen.any(axis=1)
    best = np.argmax(probs / thresholds, axis=1)
    chosen[empty, best[empty]] = True
    return chosen


def _language_axis(x: np.ndarray, languages: Sequence[str]) -> np.ndarray:
    """Unit vector from the mean of the second most common language to the most common one."""
    counts: dict[str, int] = {}
    for lang in languages:
        if lang:
            counts[lang] = counts.get(lang, 0) + 1
    top = sorted(counts, key=lambda k: (-counts[k], k))[:2]
    if len(top) < 2 or counts[top[1]] < 2:
        return np.zeros(x.shape[1])
    langs = np.array(languages)
    axis = x[langs == top[0]].mean(axis=0) - x[langs == top[1]].mean(axis=0)
    return np.asarray(axis / max(float(np.linalg.norm(axis)), 1e-12))


@dataclass(frozen=True)
class TrainingConfig:
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    folds: int = 5
    seed: int = 13


Progress = Callable[[str], None]


def train_heads(
    vectors: np.ndarray,
    items: Sequence[LabelledItem],
    *,
    encoder: str,
    config: TrainingConfig | None = None,
    progress: Progress | None = None,
) -> Heads:
    """Fit the three heads on ``vectors`` (one per item), choosing each head's L2 strength and
    the topic thresholds by cross-validation on these items only."""
    config = config or TrainingConfig()
    say = progress or (lambda _msg: None)
    x = np.asarray(vectors, dtype=np.float64)
    n = len(items)
    if x.shape[0] != n or n < 2 * config.folds:
        raise ValueError(f"{n} items, {x.shape[0]} vectors: at least {2 * config.folds} needed")
    mean = x.mean(axis=0)
    z = x - mean
    scale = float(z.std()) or 1.0
    z /= scale

    story_axis = _language_axis(x, [i.language for i in items])
    rel = np.array([i.relevant for i in items])
    topics = np.array([[t in i.topics for t in SUBJECT_TOPICS] for i in items])
    stance = np.array([STANCES.index(i.stance) for i in items])
    missing = [t for t, c in zip(SUBJECT_TOPICS, topics[rel].sum(axis=0), strict=True) if c < 2]
    if rel.sum() < 2 or (~rel).sum() < 2 or missing:
        raise ValueError(f"too few examples: relevant/not relevant or topics {missing}")
    folds = _folds(n, config.folds, config.seed)
    sw = _balanced(stance, len(STANCES))

    def oof(
        fit: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
        apply: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
        width: int,
    ) -> np.ndarray:
        out = np.zeros((n, width))
        for fold in folds:
            train_idx = np.setdiff1d(np.arange(n), fold)
            W, b = fit(train_idx)
            out[fold] = apply(z[fold], W, b)
        return out

    def sig(xs: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _sigmoid(xs @ W.T + b)

    def soft(xs: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _softmax(xs @ W.T + b)

    cv: dict[str, dict[str, float]] = {
        "relevance_f1": {},
        "topics_micro_f1": {},
        "stance_macro_f1": {},
    }
    best: dict[str, tuple[float, float]] = {}
    topic_oof: dict[float, np.ndarray] = {}
    for l2 in config.l2_grid:
        say(f"cross-validating l2={l2:g}")

        def fit_rel(idx: np.ndarray, l2: float = l2) -> tuple[np.ndarray, np.ndarray]:
            return _fit_linear(z[idx], rel[idx], l2, multiclass=False)

        def fit_top(idx: np.ndarray, l2: float = l2) -> tuple[np.ndarray, np.ndarray]:
            keep = idx[rel[idx]]
            return _fit_linear(z[keep], topics[keep], l2, multiclass=False)

        def fit_st(idx: np.ndarray, l2: float = l2) -> tuple[np.ndarray, np.ndarray]:
            return _fit_linear(z[idx], stance[idx], l2, multiclass=True, class_weight=sw)

        p_rel = oof(fit_rel, sig, 1)[:, 0]
        f_rel = _f1(rel, p_rel >= 0.5)
        p_top = oof(fit_top, sig, len(SUBJECT_TOPICS))
        topic_oof[l2] = p_top
        gold_top, pred_top = (
            topics[rel],
            _topic_decisions(p_top[rel], np.full(len(SUBJECT_TOPICS), 0.5)),
        )
        f_top = _f1(gold_top, pred_top)
        p_st = oof(fit_st, soft, len(STANCES))
        pred_st = np.argmax(p_st, axis=1)
        pred_st[p_rel < 0.5] = STANCES.index(NEUTRAL)
        f_st = _macro_f1(stance, pred_st, len(STANCES))
        for key, value in (
            ("relevance_f1", f_rel),
            ("topics_micro_f1", f_top),
            ("stance_macro_f1", f_st),
        ):
            cv[key][f"{l2:g}"] = round(value, 4)
            # Ties go to the stronger regularization (later in the ascending grid wins ties).
            if key not in best or value >= best[key][1]:
                best[key] = (l2, value)

    l2_rel, l2_top, l2_st = (
        best[k][0] for k in ("relevance_f1", "topics_micro_f1", "stance_macro_f1")
    )
    # Per-label thresholds on the chosen strength's out-of-fold probabilities.
    p_top = topic_oof[l2_top][rel]
    thresholds = np.full(len(SUBJECT_TOPICS), 0.5)
    for j in range(len(SUBJECT_TOPICS)):
        scored = [
            (_f1(topics[rel][:, j], p_top[:, j] >= t), -abs(t - 0.5), t) for t in THRESHOLD_GRID
        ]
        thresholds[j] = max(scored)[2]
    tuned_micro = _f1(topics[rel], _topic_decisions(p_top, thresholds))

    say("fitting the final heads")
    rel_W, rel_b = _fit_linear(z, rel, l2_rel, multiclass=False)
    top_W, top_b = _fit_linear(z[rel], topics[rel], l2_top, multiclass=False)
    st_W, st_b = _fit_linear(z, stance, l2_st, multiclass=True, class_weight=sw)
    return Heads(
        encoder=encoder,
        dim=x.shape[1],
        mean=mean,
        scale=scale,
        relevance_w=rel_W[0],
        relevance_b=float(rel_b[0]),
        topics_w=top_W,
        topics_b=top_b,
        thresholds=thresholds,
        stance_w=st_W,
        stance_b=st_b,
        story_axis=story_axis,
        meta={
            "training": {
                "n": n,
                "folds": config.folds,
                "seed": config.seed,
                "l2": {"relevance": l2_rel, "topics": l2_top, "stance": l2_st},
                "cross_validation": cv,
                "cv_topics_micro_f1_tuned_thresholds": round(tuned_micro, 4),
            }
        },
    )


def agreement(a: Sequence[Prediction], b: Sequence[Prediction]) -> dict[str, float]:
    """Share of items on which two prediction lists agree, per head."""
    n = max(1, len(a))
    pairs = list(zip(a, b, strict=True))
    return {
        "relevance": sum(p.relevant == q.relevant for p, q in pairs) / n,
        "topics": sum(set(p.topics) == set(q.topics) for p, q in pairs) / n,
        "stance": sum(p.stance == q.stance for p, q in pairs) / n,
    }
