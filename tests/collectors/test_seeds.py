from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlmodel import select

from collectors.seeds import derive_title, ingest_seeds, parse_dateline, parse_seed
from storage.db import SessionFactory, transaction
from storage.models import Article
from tests.conftest import SEEDS

LEFTOVERS = [
    "pic.twitter.com",
    "(@",
    "LEGGI TUTTO",
    "Storie consigliate",
    "elenco di",
    "fine dell",
    "(foto:",
]

EXPECTED = {
    "000_939f18e14c58c1a2.txt": (
        "I ministri della Difesa della Coalizione dei volenterosi si incontrano a Bruxelles",
        None,
        ["Sul tavolo l'istituzione di una forza di rassicurazione", "Gruppo Ramstein"],
    ),
    "001_50c575c39dc91c73.txt": (
        "Le incomprensioni tra gli alleati di Kiev fanno il gioco di Mosca",
        None,
        ["Sia come sia, Healey ha presieduto oggi", "Un’osservazione che ha spinto"],
    ),
    "002_14cd884f0993e09f.txt": (
        'Ucraina, i capi della difesa Nato hanno avuto una "sincera discussione"',
        None,
        ["Il ministro degli Esteri russo Sergey Lavrov", "pieno potenziale"],
    ),
    "003_bb3405057816818c.txt": (
        "Il Regno Unito e la Francia istituiranno “hub militari” in Ucraina",
        datetime(2026, 1, 6, tzinfo=UTC),
        ["L’annuncio fa seguito a un incontro", "soluzione globale"],
    ),
    "004_ce26e5f28d4ef026.txt": (
        "La Gran Bretagna e diversi paesi europei",
        None,
        ["Invece di schierare truppe", "scoraggiare autonomamente le minacce"],
    ),
}


def test_the_five_seeds_are_in_the_repo_unchanged() -> None:
    shared = SEEDS.parent.parent / "shared" / "seeds"
    names = sorted(p.name for p in SEEDS.glob("*.txt"))
    assert names == sorted(EXPECTED)
    if shared.is_dir():  # beside the clone, as in CI
        for name in names:
            assert (SEEDS / name).read_bytes() == (shared / name).read_bytes()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seed_title_date_language_and_body(name: str) -> None:
    title_start, published, kept = EXPECTED[name]
    seed = parse_seed(SEEDS / name)
    assert seed.title.startswith(title_start)
    assert len(seed.title) <= 200
    assert seed.published_at == published
    assert seed.language == "it"
    for leftover in LEFTOVERS:
        assert leftover not in seed.text, leftover
    for phrase in kept:
        assert phrase in seed.text, phrase
    assert not seed.text.rstrip().endswith("Today")
    assert seed.title not in seed.text.split("\n\n")[0] or name == "004_ce26e5f28d4ef026.txt"


def test_tweet_and_caption_removed_with_their_text_but_neighbours_kept() -> None:
    seed = parse_seed(SEEDS / "001_50c575c39dc91c73.txt")
    assert "In Brussels today" not in seed.text
    assert "We stand by Ukraine" not in seed.text
    assert "Kaja Kallas (foto" not in seed.text
    # The sentence before the tweet survives, as its own paragraph end.
    assert "ogni coinvolgimento militare nell’ex repubblica sovietica." in seed.text
    # Glued paragraphs are split back apart.
    assert "avanti”.\n\nUn’osservazione" in seed.text
    assert "\n\nSia come sia" in seed.text


def test_title_derived_from_first_sentence_when_the_file_has_none() -> None:
    seed = parse_seed(SEEDS / "004_ce26e5f28d4ef026.txt")
    assert seed.title.endswith("…")
    assert len(seed.title.split()) <= 15
    # The derived title is not removed from the body: the first paragraph is intact.
    assert seed.text.startswith("La Gran Bretagna e diversi paesi europei tendono")


def test_datelines() -> None:
    assert parse_dateline("Pubblicato il 6 gennaio 2026").isoformat() == "2026-01-06"  # type: ignore[union-attr]
    assert parse_dateline("Published on 12 March 2025").isoformat() == "2025-03-12"  # type: ignore[union-attr]
    assert parse_dateline("Published January 6, 2026").isoformat() == "2026-01-06"  # type: ignore[union-attr]
    assert parse_dateline("Il 6 gennaio 2026 i leader si sono visti") is None
    assert parse_dateline("Pubblicato il 31 febbraio 2026") is None


def test_derive_title_keeps_short_sentences_whole() -> None:
    assert derive_title("Short sentence here. Another one.") == "Short sentence here"


def test_ingesting_twice_keeps_five_and_new_files_are_added(
    sessions: SessionFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "seeds"
    shutil.copytree(SEEDS, folder)
    now = datetime(2026, 11, 21, tzinfo=UTC)
    for _ in range(2):
        with transaction(sessions) as s:
            ingest_seeds(s, folder, now)
    with sessions() as s:
        rows = s.exec(select(Article)).all()
        assert len(rows) == 5
        assert {a.source for a in rows} == {"seed"}
        assert all(a.status == "new" for a in rows)
    (folder / "005_new.txt").write_text(
        "Nuovo vertice della coalizione dei volenterosi a Roma\n"
        "I leader europei si sono riuniti per discutere la forza di rassicurazione.\n",
        encoding="utf-8",
    )
    (folder / "006_empty.txt").write_text("\n\n", encoding="utf-8")
    with transaction(sessions) as s:
        result = ingest_seeds(s, folder, now)
    assert (result.added, result.unchanged, result.failed) == (1, 5, 1)
    with sessions() as s:
        titles = [a.title for a in s.exec(select(Article)).all()]
    assert len(titles) == 6
    assert "Nuovo vertice della coalizione dei volenterosi a Roma" in titles
