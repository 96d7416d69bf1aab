"""The classify stage: claim → embed → classify → store (classification, embedding, story).

Pending articles are those with status ``new`` and those with no classification from the
current ``model_version`` (a new encoder or new heads reclassify everything stored). They are
claimed in batches with a lease; each batch is embedded in one pass (vectors already stored for
the same encoder and content are reused, never computed twice), and stored in one transaction
that writes the ``Classification``, the float16 embedding, the story membership and the status
``classified``, and releases the lease. An article whose lease was lost, or whose content
changed while it was being classified, is left for the next run.

Reclassification (``reclassify_all`` or a changed model version) refreshes the classification
of articles already ``classified`` or ``evaluated`` without changing their status, so alerts
already sent are not sent again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import numpy as np
import sqlalchemy as sa
from sqlmodel import Session, col

from processors.heads import Prediction
from processors.labelled import article_text
from processors.stories import assign_story, from_float16_bytes, leave_story, to_float16_bytes
from storage.claims import claim, release, still_owned
from storage.db import SessionFactory, serialize, transaction
from storage.models import Article, ArticleStatus, Classification, utcnow

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

STORIES_LOCK = "coalition-watch:stories"


class ArticleClassifier(Protocol):
    model_version: str

    @property
    def encoder_id(self) -> str: ...

    def embed(self, documents: Sequence[str]) -> np.ndarray: ...

    def predict(self, vectors: np.ndarray) -> list[Prediction]: ...

    def story_vectors(self, vectors: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ClassifyOptions:
    batch_size: int = 32
    lease: timedelta = timedelta(minutes=10)
    story_threshold: float = 0.35
    story_window: timedelta = timedelta(hours=72)
    stories_relevant_only: bool = True


@dataclass
class BatchStats:
    size: int
    seconds: float


@dataclass
class ClassifyResult:
    classified: int = 0
    reclassified: int = 0
    embedded: int = 0
    reused_embeddings: int = 0
    skipped: int = 0  # lease lost or content changed meanwhile
    relevant: int = 0
    stories_created: int = 0
    stories_joined: int = 0
    topics: Counter[str] = field(default_factory=Counter)
    stances: Counter[str] = field(default_factory=Counter)
    batches: list[BatchStats] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return self.classified + self.reclassified


def embedding_key(encoder_id: str, article: Article) -> str:
    return f"{encoder_id[:150]}@{article.content_hash[:16]}"


def _current(model_version: str) -> Any:
    return (
        sa.select(Classification.id)  # type: ignore[call-overload]
        .where(
            Classification.article_id == Article.id,
            Classification.model_version == model_version,
        )
        .exists()
    )


def pending_filter(model_version: str) -> sa.ColumnElement[bool]:
    """New articles, and articles without a classification from ``model_version``."""
    return sa.or_(col(Article.status) == ArticleStatus.NEW, ~_current(model_version))


def count_pending(sessions: SessionFactory, model_version: str | None = None) -> int:
    where = (
        pending_filter(model_version) if model_version else col(Article.status) == ArticleStatus.NEW
    )
    with sessions() as session:
        return int(session.execute(sa.select(sa.func.count(Article.id)).where(where)).scalar_one())  # type: ignore[arg-type]


def classify_pending(
    sessions: SessionFactory,
    classifier: ArticleClassifier,
    *,
    owner: str,
    clock: Clock,
    options: ClassifyOptions,
    reclassify_all: bool = False,
    stop: threading.Event | None = None,
    on_batch: Callable[[BatchStats], None] | None = None,
) -> ClassifyResult:
    """Classify pending articles (every stored one with ``reclassify_all``) until none is left."""
    result = ClassifyResult()
    cursor = 0  # reclassify_all walks the table by id, once
    version = classifier.model_version
    while not (stop is not None and stop.is_set()):
        table: Any = Article
        if reclassify_all:
            where = [table.id > cursor]
            order = [table.id]
        else:
            where = [pending_filter(version)]
            order = [sa.case((table.status == ArticleStatus.NEW, 0), else_=1), table.id]
        batch = claim(
            sessions,
            Article,
            where=where,
            order_by=order,
            limit=options.batch_size,
            owner=owner,
            lease=options.lease,
            now=clock(),
        )
        if not batch:
            break
        cursor = max(a.id or 0 for a in batch)
        started = time.perf_counter()
        _classify_batch(sessions, classifier, batch, owner=owner, options=options, result=result)
        stats = BatchStats(len(batch), time.perf_counter() - started)
        result.batches.append(stats)
        if on_batch is not None:
            on_batch(stats)
    return result


def _classify_batch(
    sessions: SessionFactory,
    classifier: ArticleClassifier,
    batch: list[Article],
    *,
    owner: str,
    options: ClassifyOptions,
    result: ClassifyResult,
) -> None:
    encoder_id = classifier.encoder_id
    vectors: list[np.ndarray | None] = []
    todo: list[int] = []
    for i, article in enumerate(batch):
        if article.embedding and article.embedding_key == embedding_key(encoder_id, article):
            vectors.append(from_float16_bytes(article.embedding))
            result.reused_embeddings += 1
        else:
            vectors.append(None)
            todo.append(i)
    if todo:
        fresh = classifier.embed([article_text(batch[i].title, batch[i].text) for i in todo])
        for i, v in zip(todo, fresh, strict=True):
            # Stored as float16: classify from exactly what later runs will read back.
            vectors[i] = from_float16_bytes(to_float16_bytes(v))
        result.embedded += len(todo)
    matrix = np.stack([v for v in vectors if v is not None])
    predictions = classifier.predict(matrix)
    with transaction(sessions) as session:
        # Replicas take turns to store (PostgreSQL): story assignment reads the recent stories
        # and may create one, so two replicas must not both create a story for one event.
        serialize(session, STORIES_LOCK)
        for article, vector, prediction in zip(batch, matrix, predictions, strict=True):
            assert article.id is not None
            row = still_owned(session, Article, article.id, owner)
            if row is None or row.content_hash != article.content_hash:
                if row is not None:  # content changed meanwhile: leave it pending
                    release(row)
                    session.add(row)
                result.skipped += 1
                continue
            _store(session, row, vector, prediction, classifier, options, result)


def _store(
    session: Session,
    row: Article,
    vector: np.ndarray,
    prediction: Prediction,
    classifier: ArticleClassifier,
    options: ClassifyOptions,
    result: ClassifyResult,
) -> None:
    key = embedding_key(classifier.encoder_id, row)
    old_vector = from_float16_bytes(row.embedding) if row.embedding else None
    new_embedding = row.embedding_key != key
    existing = session.execute(
        sa.select(Classification).where(
            col(Classification.article_id) == row.id,
            col(Classification.model_version) == classifier.model_version,
        )
    ).scalar_one_or_none()
    record = existing or Classification(
        article_id=row.id,  # type: ignore[arg-type]
        model_version=classifier.model_version,
        relevant=prediction.relevant,
        relevance_score=prediction.relevance_score,
        stance=prediction.stance,
        stance_score=prediction.stance_score,
    )
    record.relevant = prediction.relevant
    record.relevance_score = prediction.relevance_score
    record.topics = list(prediction.topics)
    record.topic_scores = dict(prediction.topic_scores)
    record.stance = prediction.stance
    record.stance_score = prediction.stance_score
    record.stance_scores = dict(prediction.stance_scores)
    if existing is not None:
        record.created_at = utcnow()
    session.add(record)

    if new_embedding:
        row.embedding = to_float16_bytes(vector)
        row.embedding_key = key
    joins = prediction.relevant or not options.stories_relevant_only
    if row.story_id is not None and (new_embedding or not joins):
        old = classifier.story_vectors(old_vector[None, :])[0] if old_vector is not None else None
        leave_story(session, row, old)
    if joins and row.story_id is None:
        choice = assign_story(
            session,
            row,
            classifier.story_vectors(vector[None, :])[0],
            threshold=options.story_threshold,
            window=options.story_window,
        )
        if choice.created:
            result.stories_created += 1
        else:
            result.stories_joined += 1

    if row.status == ArticleStatus.NEW:
        row.status = ArticleStatus.CLASSIFIED
        result.classified += 1
    else:
        result.reclassified += 1
    release(row)
    session.add(row)
    session.flush()
    if prediction.relevant:
        result.relevant += 1
        result.stances[prediction.stance] += 1
    result.topics.update(prediction.topics)
