"""The classifier: an encoder (:mod:`processors.encoder`) plus heads (:mod:`processors.heads`).

:func:`load_classifier` resolves the encoder named by the options (the built default, a model
folder or a hub id), loads the heads that were trained on it and decides the precision;
:func:`train` fits and saves new heads from labelled JSONL; :func:`evaluate_file` scores the
classifier on a labelled file. Nothing here touches the database: :mod:`processors.classify`
is the pipeline stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from processors.classify import ClassifyOptions
from processors.e5convert import MODEL_NAME, cache_root, default_model_dir
from processors.encoder import (
    Attention,
    Encoder,
    Precision,
    cpu_supports_bf16,
    host_signature,
    speed_ratio,
)
from processors.evaluation import Report, evaluate
from processors.heads import Heads, HeadsError, Prediction, TrainingConfig, agreement, train_heads
from processors.labelled import (
    LabelledItem,
    check_disjoint,
    data_hash,
    read_jsonl,
    read_split,
    split_files,
)

log = logging.getLogger(__name__)

DEFAULT_ENCODER = MODEL_NAME
PACKAGE_HEADS_DIR = Path(__file__).resolve().parent / "heads"
PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "data"
# bfloat16 is kept only when its dev-set predictions agree with float32 this often, per head…
BF16_MIN_AGREEMENT = 0.98
# …no dev metric drops by more than this…
BF16_MAX_METRIC_DROP = 0.01
# …and it actually runs faster than float32 on the machine at hand.
BF16_MIN_SPEEDUP = 1.1


class ClassifierOptions(BaseModel):
    """Settings of the classifier, the classify job and story clustering."""

    model_config = {"extra": "forbid"}

    encoder: str = Field(
        default=DEFAULT_ENCODER,
        description="'multilingual-e5-small' (built by `model build`), a model folder or a hub id",
    )
    model_dir: Path | None = Field(
        default=None,
        description="where the default encoder is built; ~/.cache/coalition-watch/models/…",
    )
    offline: bool = Field(default=True, description="never reach a model hub")
    heads_dir: Path | None = Field(default=None, description="trained heads; processors/heads")
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    attention: Attention = Field(
        default="auto",
        description="'auto': the project's CPU attention kernel where it builds, else PyTorch's "
        "sdpa; 'kernel': require the kernel; 'sdpa': never use it",
    )
    threads: int = Field(default=0, ge=0, description="torch threads; 0 = the usable cores")
    batch_size: int = Field(default=16, ge=1, le=512, description="most windows per forward pass")
    batch_tokens: int = Field(
        default=2048, ge=64, description="most (padded) tokens per forward pass"
    )
    claim_batch: int = Field(default=32, ge=1, le=1000, description="articles per claimed batch")
    lease_seconds: float = Field(default=600.0, gt=0)
    interval: float = Field(default=30.0, gt=0, description="seconds between classify runs")
    story_window_hours: float = Field(default=72.0, gt=0)
    story_threshold: float = Field(
        default=0.35, gt=0, le=1, description="cosine (story space) to join a story"
    )
    stories_relevant_only: bool = Field(
        default=True, description="only relevant articles join stories"
    )

    def encoder_source(self) -> str:
        """What AutoModel loads: the default's folder, a folder, or a hub id."""
        if self.encoder == DEFAULT_ENCODER:
            return str((self.model_dir or default_model_dir()).expanduser())
        return self.encoder

    def heads_path(self) -> Path:
        return (self.heads_dir or PACKAGE_HEADS_DIR).expanduser()

    def stage_options(self) -> ClassifyOptions:
        return ClassifyOptions(
            batch_size=self.claim_batch,
            lease=timedelta(seconds=self.lease_seconds),
            story_threshold=self.story_threshold,
            story_window=timedelta(hours=self.story_window_hours),
            stories_relevant_only=self.stories_relevant_only,
        )


def model_version(encoder_id: str, heads: Heads) -> str:
    """``<encoder>+<heads hash>``; a long encoder id (a path) is shortened to fit 128 chars."""
    name = encoder_id
    if len(name) > 96:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{Path(name).name[:80]}~{digest}"
    return f"{name}+{heads.digest[:12]}"


def decide_precision(option: str, heads: Heads, encoder: Encoder) -> tuple[Encoder, str]:
    """The encoder at the precision for this process, and why.

    bfloat16 is used only where the CPU runs it natively, the heads' training run found its
    dev-set predictions equal to float32's, and it measures faster than float32 here;
    float32 otherwise. ``encoder`` is the float32 encoder; it is converted in place, so the
    process never holds both copies once the decision is made.
    """
    if option == "float32":
        return encoder, "float32 configured"
    if not cpu_supports_bf16():
        if option == "bfloat16":
            log.warning("precision bfloat16 configured but this CPU has no native bfloat16")
        return encoder, "float32: this CPU has no native bfloat16"
    if option == "bfloat16":
        return encoder.to_precision("bfloat16"), "bfloat16 configured"
    check = heads.meta.get("precision_check") or {}
    if not check.get("bf16_checked"):
        return encoder, "float32: bfloat16 was not checked against the dev set"
    if not check.get("bf16_matches"):
        return encoder, "float32: bfloat16 predictions differed from float32 on the dev set"
    ratio = _recorded_speed_ratio(encoder)
    if ratio < BF16_MIN_SPEEDUP:
        return encoder, (
            f"float32: bfloat16 matches float32 on the dev set but runs at {ratio:.2f}x "
            "float32's speed on this CPU"
        )
    return (
        encoder.to_precision("bfloat16"),
        f"bfloat16: matches float32 on the dev set and runs {ratio:.2f}x faster",
    )


def _recorded_speed_ratio(encoder: Encoder) -> float:
    """bfloat16/float32 speed on this host: measured once, then read from the cache folder.

    Keyed by encoder, host and attention implementation: the attention kernel changes the
    ratio (on one Zen 4 machine, 1.68x with PyTorch's sdpa and 2.65x with the kernel).
    """
    path = cache_root() / "precision.json"
    key = f"{encoder.encoder_id}|{host_signature()}|{encoder.attention}"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    entry = recorded.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("bf16_speed_ratio"), int | float):
        return float(entry["bf16_speed_ratio"])
    ratio = round(speed_ratio(encoder.with_precision("bfloat16"), encoder), 3)
    recorded[key] = {
        "bf16_speed_ratio": ratio,
        "attention": encoder.attention,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(recorded, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot record the precision decision in %s: %s", path, exc)
    return ratio


class Classifier:
    """Encoder + heads. ``classify`` embeds and predicts; ``predict`` reuses stored vectors."""

    def __init__(self, encoder: Encoder, heads: Heads, precision_reason: str = "") -> None:
        if heads.dim != encoder.dim:
            raise HeadsError(f"heads expect {heads.dim}-dim vectors, encoder gives {encoder.dim}")
        self.encoder = encoder
        self.heads = heads
        self.precision_reason = precision_reason
        self.model_version = model_version(encoder.encoder_id, heads)

    @property
    def encoder_id(self) -> str:
        return self.encoder.encoder_id

    def embed(self, documents: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(documents)

    def predict(self, vectors: np.ndarray) -> list[Prediction]:
        return self.heads.predict(vectors)

    def story_vectors(self, vectors: np.ndarray) -> np.ndarray:
        return self.heads.story_vectors(vectors)

    def classify(self, documents: Sequence[str]) -> tuple[np.ndarray, list[Prediction]]:
        vectors = self.embed(documents)
        return vectors, self.predict(vectors)


def load_encoder(options: ClassifierOptions, precision: Precision = "float32") -> Encoder:
    source = options.encoder_source()
    if options.encoder == DEFAULT_ENCODER and not Path(source).is_dir():
        raise OSError(
            f"the default encoder is not built in {source}: run `coalition-watch model build`"
        )
    return Encoder.load(
        source,
        encoder_id=options.encoder,
        offline=options.offline,
        batch_size=options.batch_size,
        batch_tokens=options.batch_tokens,
        precision=precision,
        threads=options.threads,
        attention=options.attention,
    )


def load_classifier(options: ClassifierOptions) -> Classifier:
    """Load heads, decide the precision, load the encoder. Errors name the culprit."""
    heads = Heads.load(options.heads_path())
    if heads.encoder != options.encoder:
        raise HeadsError(
            f"heads in {options.heads_path()} were trained on encoder {heads.encoder!r}, "
            f"but the configured encoder is {options.encoder!r}: retrain with `model train`"
        )
    encoder, reason = decide_precision(options.precision, heads, load_encoder(options))
    classifier = Classifier(encoder, heads, reason)
    log.info(
        "classifier %s loaded, %s, attention %s",
        classifier.model_version,
        reason,
        encoder.attention,
    )
    return classifier


# ---------------------------------------------------------------------------- vector cache


class VectorCache:
    """Training-time cache of sentence vectors, keyed by encoder, precision and text."""

    def __init__(self, folder: Path, encoder: Encoder) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.encoder_id)[-80:]
        self.path = folder / f"{safe}-{encoder.precision}-{encoder.max_tokens}.npz"
        self.encoder = encoder
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            try:
                with np.load(self.path) as data:
                    keys, values = data["keys"], data["vectors"]
                    self.vectors = {str(k): v for k, v in zip(keys, values, strict=True)}
            except (OSError, ValueError, KeyError):
                self.vectors = {}

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def encode(self, documents: Sequence[str]) -> np.ndarray:
        keys = [self.key(d) for d in documents]
        todo = sorted(
            {k: d for k, d in zip(keys, documents, strict=True) if k not in self.vectors}.items()
        )
        if todo:
            fresh = self.encoder.encode([d for _k, d in todo])
            for (k, _d), v in zip(todo, fresh, strict=True):
                self.vectors[k] = v
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp.npz")
            np.savez(
                tmp,
                keys=np.array(list(self.vectors)),
                vectors=np.stack(list(self.vectors.values())),
            )
            tmp.replace(self.path)
        return (
            np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, self.encoder.dim))
        )


# ---------------------------------------------------------------------------- train / eval


@dataclass
class TrainResult:
    heads: Heads
    model_version: str
    dev: Report | None
    precision_check: dict[str, Any]


def train(
    options: ClassifierOptions,
    *,
    data_dir: Path = PACKAGE_DATA_DIR,
    out_dir: Path | None = None,
    use_cache: bool = True,
    check_bf16: bool = True,
    config: TrainingConfig | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> TrainResult:
    """Fit heads on ``data_dir``'s train split, score them on its dev split, save them."""
    train_items = read_split(data_dir, "train")
    dev_files = split_files(data_dir, "dev")
    dev_items = read_split(data_dir, "dev") if dev_files else []
    check_disjoint(train_items, dev_items)
    say(f"{len(train_items)} training and {len(dev_items)} dev examples from {data_dir}")

    encoder = load_encoder(options, "float32")
    cache_dir = cache_root() / "embeddings"
    embed: Callable[[Sequence[str]], np.ndarray] = (
        VectorCache(cache_dir, encoder).encode if use_cache else encoder.encode
    )
    say("embedding the training examples")
    x_train = embed([i.document for i in train_items])
    heads = train_heads(x_train, train_items, encoder=options.encoder, config=config, progress=say)
    heads.meta["training_data"] = {
        "sha256": data_hash(train_items),
        "n": len(train_items),
        "files": [p.name for p in split_files(data_dir, "train")],
    }
    report: Report | None = None
    check: dict[str, Any] = {"bf16_checked": False}
    if dev_items:
        say("embedding the dev examples")
        x_dev = embed([i.document for i in dev_items])
        predictions = heads.predict(x_dev)
        report = evaluate(dev_items, predictions)
        heads.meta["dev_data"] = {
            "sha256": data_hash(dev_items),
            "n": len(dev_items),
            "files": [p.name for p in dev_files],
        }
        heads.meta["dev_metrics"] = report.summary()
        if check_bf16 and cpu_supports_bf16():
            say("checking bfloat16 against float32 on the dev examples")
            bf16 = encoder.with_precision("bfloat16")
            bf16_predictions = heads.predict(bf16.encode([i.document for i in dev_items]))
            bf16_report = evaluate(dev_items, bf16_predictions)
            agree = agreement(predictions, bf16_predictions)
            drops = {k: round(v - bf16_report.summary()[k], 4) for k, v in report.summary().items()}
            check = {
                "bf16_checked": True,
                "agreement": {k: round(v, 4) for k, v in agree.items()},
                "metric_drop": drops,
                "bf16_matches": min(agree.values()) >= BF16_MIN_AGREEMENT
                and max(drops.values()) <= BF16_MAX_METRIC_DROP,
                "bf16_speed_ratio_at_training": round(speed_ratio(bf16, encoder), 2),
            }
        elif check_bf16:
            check = {"bf16_checked": False, "reason": "the training machine has no native bfloat16"}
    heads.meta["precision_check"] = check
    target = out_dir or options.heads_path()
    heads.save(target)
    say(f"heads saved in {target}")
    return TrainResult(heads, model_version(options.encoder, heads), report, check)


def evaluate_items(classifier: Classifier, items: Sequence[LabelledItem]) -> Report:
    """Classify ``items`` (timed: embedding + heads) and score them."""
    start = time.perf_counter()
    _vectors, predictions = classifier.classify([i.document for i in items])
    elapsed = time.perf_counter() - start
    report = evaluate(items, predictions, articles_per_second=len(items) / max(elapsed, 1e-9))
    report.extra = {
        "model_version": classifier.model_version,
        "precision": classifier.encoder.precision,
        "attention": classifier.encoder.attention,
    }
    return report


def evaluate_file(classifier: Classifier, path: Path) -> Report:
    items = read_jsonl(path)
    if not items:
        raise ValueError(f"{path}: no labelled examples")
    return evaluate_items(classifier, items)
