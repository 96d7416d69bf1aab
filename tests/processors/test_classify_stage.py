"""The classify stage on a real database with the real classifier: claims, storage, stories."""

from __future__ import annotations

import gc
import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import select

from collectors.seeds import content_hash
from processors.classifier import Classifier, ClassifierOptions
from processors.classify import ClassifyOptions, ClassifyResult, classify_pending, count_pending
from processors.heads import Heads
from service.config import load_settings
from service.context import build_context
from service.jobs import ClassifyJobs, run_classify
from storage.db import SessionFactory, transaction
from storage.models import Article, Classification, Story

EVENTS = Path(__file__).resolve().parents[1] / "data" / "story_events.jsonl"
NOW = datetime(2026, 2, 15, 12, 0, tzinfo=UTC)


def _clock() -> datetime:
    return NOW


def _add(
    sessions: SessionFactory, rows: list[dict[str, str]], shift: timedelta = timedelta()
) -> list[int]:
    ids = []
    with transaction(sessions) as session:
        for i, row in enumerate(rows):
            article = Article(
                uid=f"test:{row.get('event', 'x')}:{i}:{shift}",
                source="feed",
                guid=f"g{i}",
                outlet=row.get("outlet"),
                title=row["title"],
                text=row["text"],
                language=row.get("language"),
                published_at=datetime.fromisoformat(row["published_at"]) + shift
                if row.get("published_at")
                else None,
                fetched_at=NOW,
                content_hash=content_hash(row["title"], row["text"]),
            )
            session.add(article)
            session.flush()
            assert article.id is not None
            ids.append(article.id)
    return ids


def _events() -> list[dict[str, str]]:
    return [json.loads(line) for line in EVENTS.read_text(encoding="utf-8").splitlines() if line]


def _run(
    sessions: SessionFactory, classifier: Classifier, *, reclassify_all: bool = False
) -> ClassifyResult:
    return classify_pending(
        sessions, classifier, owner="test", clock=_clock, options=ClassifyOptions(),
        reclassify_all=reclassify_all,
    )  # fmt: skip


def test_pending_articles_are_classified_once_and_stored(
    sessions: SessionFactory, classifier: Classifier
) -> None:
    ids = _add(sessions, _events()[:3])
    assert count_pending(sessions, classifier.model_version) == 3
    result = _run(sessions, classifier)
    assert result.classified == 3 and result.embedded == 3 and result.skipped == 0
    with sessions() as session:
        for article_id in ids:
            a = session.get(Article, article_id)
            assert a is not None
            assert a.status == "classified" and a.claimed_by is None and a.claimed_until is None
            assert a.embedding is not None and len(a.embedding) == 384 * 2  # float16
            assert a.embedding_key and a.embedding_key.startswith("multilingual-e5-small@")
            rows = session.exec(
                select(Classification).where(Classification.article_id == article_id)
            ).all()
            assert len(rows) == 1
            c = rows[0]
            assert c.model_version == classifier.model_version and c.relevant
            assert c.topics and set(c.topic_scores) >= set(c.topics)
            assert 0 <= c.relevance_score <= 1 and c.stance in {"supportive", "critical", "neutral"}
    again = _run(sessions, classifier)
    assert again.stored == 0 and count_pending(sessions, classifier.model_version) == 0


def test_one_event_in_italian_and_english_is_one_story(
    sessions: SessionFactory, classifier: Classifier
) -> None:
    rows = _events()
    ids = _add(sessions, rows)
    result = _run(sessions, classifier)
    assert result.classified == len(rows) and result.relevant == len(rows)
    by_event: dict[str, set[int]] = defaultdict(set)
    with sessions() as session:
        for article_id, row in zip(ids, rows, strict=True):
            a = session.get(Article, article_id)
            assert a is not None and a.story_id is not None
            by_event[row["event"]].add(a.story_id)
        # Each event is one story, and different events are different stories.
        assert all(len(stories) == 1 for stories in by_event.values()), by_event
        story_ids = [next(iter(s)) for s in by_event.values()]
        assert len(set(story_ids)) == len(by_event)
        demining = session.get(Story, next(iter(by_event["black-sea-demining"])))
        assert demining is not None
        assert demining.article_count == 3 and demining.source_count == 3
        assert demining.first_seen_at == datetime(2026, 2, 10, 9, 0, tzinfo=UTC)
        assert demining.last_seen_at == datetime(2026, 2, 10, 17, 10, tzinfo=UTC)
        languages = {
            a.language for a in session.exec(select(Article).where(Article.story_id == demining.id))
        }
        assert languages == {"it", "en"}
        assert demining.centroid is not None and len(demining.centroid) == 384 * 4


def test_a_report_outside_the_time_window_starts_a_new_story(
    sessions: SessionFactory, classifier: Classifier
) -> None:
    rows = [r for r in _events() if r["event"] == "bundestag-air-policing"]
    first = _add(sessions, rows[:1])
    later = _add(sessions, rows[1:], shift=timedelta(days=5))
    _run(sessions, classifier)
    with sessions() as session:
        a, b = session.get(Article, first[0]), session.get(Article, later[0])
        assert a is not None and b is not None and a.story_id != b.story_id


def test_reclassify_all_reuses_the_stored_embeddings(
    sessions: SessionFactory, classifier: Classifier
) -> None:
    ids = _add(sessions, _events()[:4])
    _run(sessions, classifier)
    with sessions() as session:
        stories = [session.get(Article, i).story_id for i in ids]  # type: ignore[union-attr]
    result = _run(sessions, classifier, reclassify_all=True)
    assert result.reclassified == 4 and result.embedded == 0 and result.reused_embeddings == 4
    with sessions() as session:
        assert [session.get(Article, i).story_id for i in ids] == stories  # type: ignore[union-attr]
        assert len(session.exec(select(Classification)).all()) == 4  # updated in place


def test_a_new_model_version_reclassifies_without_recomputing(
    sessions: SessionFactory, classifier: Classifier, tmp_path: Path
) -> None:
    _add(sessions, _events()[:2])
    _run(sessions, classifier)
    classifier.heads.save(tmp_path)
    heads = Heads.load(tmp_path)
    heads.thresholds = heads.thresholds * 0.9  # different heads → a different model_version
    newer = Classifier(classifier.encoder, heads)
    assert newer.model_version != classifier.model_version
    assert count_pending(sessions, newer.model_version) == 2
    result = classify_pending(
        sessions, newer, owner="test", clock=_clock, options=ClassifyOptions()
    )
    assert result.reclassified == 2 and result.embedded == 0
    with sessions() as session:
        versions = {c.model_version for c in session.exec(select(Classification)).all()}
        assert versions == {classifier.model_version, newer.model_version}
        assert {a.status for a in session.exec(select(Article)).all()} == {"classified"}


def test_changed_content_is_embedded_again_and_moves_story(
    sessions: SessionFactory, classifier: Classifier
) -> None:
    rows = _events()
    ids = _add(sessions, rows[:2])  # one event, Italian and English
    _run(sessions, classifier)
    czech = next(r for r in rows if r["event"] == "czech-ammunition")
    with transaction(sessions) as session:
        a = session.get(Article, ids[1])
        assert a is not None
        old_story = a.story_id
        a.title, a.text = czech["title"], czech["text"]
        a.content_hash = content_hash(a.title, a.text)
        a.status = "new"
        session.add(a)
    result = _run(sessions, classifier)
    assert result.classified == 1 and result.embedded == 1
    with sessions() as session:
        a = session.get(Article, ids[1])
        assert a is not None and a.story_id != old_story
        old = session.get(Story, old_story)
        assert old is not None and old.article_count == 1
        assert len(session.exec(select(Classification)).all()) == 2


def test_the_job_records_its_metrics(db_url: str, classifier: Classifier, e5_dir: Path) -> None:
    settings = load_settings(database_url=db_url, classifier={"model_dir": str(e5_dir)})
    ctx = build_context(settings)
    try:
        _add(ctx.sessions, _events()[:5])
        jobs = ClassifyJobs(settings.classifier, _classifier=classifier)
        result = run_classify(ctx, jobs)
        assert result.classified == 5
        r = ctx.metrics.registry
        assert (
            r.get_sample_value("coalition_watch_articles_classified_total", {"relevant": "true"})
            == 5
        )
        assert r.get_sample_value("coalition_watch_classification_batch_size_count") == 1
        assert r.get_sample_value("coalition_watch_classification_batch_size_sum") == 5
        assert (
            r.get_sample_value("coalition_watch_classification_batch_duration_seconds_count") == 1
        )
        assert (
            r.get_sample_value("coalition_watch_articles_pending", {"stage": "classification"}) == 0
        )
        topic = r.get_sample_value(
            "coalition_watch_articles_by_topic_total", {"topic": "reassurance_force"}
        )
        assert topic is not None and topic >= 1
        stances = sum(
            r.get_sample_value("coalition_watch_articles_by_stance_total", {"stance": s}) or 0
            for s in ("supportive", "critical", "neutral")
        )
        assert stances == 5
    finally:
        ctx.close()


@pytest.mark.parametrize("relevant_only", [True, False])
def test_irrelevant_articles_join_stories_only_when_configured(
    sessions: SessionFactory, classifier: Classifier, relevant_only: bool
) -> None:
    ids = _add(
        sessions,
        [
            {
                "title": "Serie A, l'Inter vince il derby",
                "text": "L'Inter ha battuto il Milan 2-0 nel derby e allunga in classifica; "
                "decisivi i gol del secondo tempo.",
            }
        ],
    )
    classify_pending(
        sessions, classifier, owner="t", clock=_clock,
        options=ClassifyOptions(stories_relevant_only=relevant_only),
    )  # fmt: skip
    with sessions() as session:
        a = session.get(Article, ids[0])
        assert a is not None and a.status == "classified"
        assert (a.story_id is None) == relevant_only
        c = session.exec(select(Classification)).one()
        assert not c.relevant and c.topics == ["off_topic"]
    assert np.isfinite(c.relevance_score)


def test_options_map_to_the_stage(classifier_options: ClassifierOptions) -> None:
    stage = classifier_options.stage_options()
    assert stage.story_window == timedelta(hours=72)
    assert stage.batch_size == classifier_options.claim_batch


def test_the_loaded_model_is_kept_out_of_the_garbage_collectors_scans(
    classifier_options: ClassifierOptions,
) -> None:
    """A full collection over the model's objects held the GIL ~250 ms: /healthz stalled."""
    gc.unfreeze()
    try:
        jobs = ClassifyJobs(classifier_options)
        assert jobs.checks["model"] == "loading"
        loaded = jobs.classifier()
        assert jobs.checks["model"] == ""
        assert gc.get_freeze_count() > 100_000
        tracked = {id(o) for o in gc.get_objects()}
        modules = list(loaded.encoder.model.modules())
        assert len(modules) > 100 and not any(id(m) in tracked for m in modules)
    finally:
        gc.unfreeze()
