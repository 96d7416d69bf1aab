"""OPML import/export: nested outlines, tolerant reading, a round trip, the starter list."""

from __future__ import annotations

import pytest

from collectors.opml import OpmlError, read_opml, write_opml
from tests.collectors.conftest import DATA, START
from tests.conftest import REPO


def test_nested_outlines_and_categories() -> None:
    doc = read_opml((DATA / "nested.opml").read_bytes(), "nested.opml")
    assert doc.title == "Nested test subscriptions" and doc.warnings == []
    assert [(f.url, f.category) for f in doc.feeds] == [
        ("https://notizie.example.it/feeds/esteri.xml", "Italia/Agenzie"),
        ("https://notizie.example.it/feeds/politica.xml", "Italia"),
        ("https://wire.example.com/europe/atom.xml", "International"),  # its twin is dropped
        ("https://top.example.net/rss", None),
    ]
    assert doc.feeds[0].title == "Cronache di prova – Esteri"
    assert doc.feeds[0].site_url == "https://notizie.example.it/esteri/"


def test_ill_formed_opml_is_read_outline_by_outline() -> None:
    doc = read_opml((DATA / "broken.opml").read_bytes(), "broken.opml")
    assert doc.warnings and "broken.opml is not well-formed XML" in doc.warnings[0]
    assert [f.url for f in doc.feeds] == [
        "https://notizie.example.it/feeds/esteri.xml",
        "https://wire.example.com/europe/atom.xml",
    ]
    assert doc.feeds[1].title == "Wire & Europe"
    assert doc.invalid == ["ftp://files.example.org/feed.xml"]


@pytest.mark.parametrize(
    "data",
    [b"<html><body>nope</body></html>", b"plain text, no outline", b"<opml><head/></opml>"],
)
def test_not_opml_is_refused_with_the_file_named(data: bytes) -> None:
    with pytest.raises(OpmlError, match=r"subs\.opml"):
        read_opml(data, "subs.opml")


def test_export_reads_back() -> None:
    doc = read_opml((DATA / "nested.opml").read_bytes(), "nested.opml")
    text = write_opml(doc.feeds, title="Round & trip", now=START)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    again = read_opml(text.encode(), "exported")
    assert again.title == "Round & trip" and again.warnings == []
    assert [(f.url, f.title, f.site_url, f.category) for f in again.feeds] == [
        (f.url, f.title, f.site_url, f.category) for f in doc.feeds
    ]


def test_starter_list_is_real_and_well_formed() -> None:
    doc = read_opml((REPO / "collectors" / "starter.opml").read_bytes(), "starter.opml")
    assert doc.warnings == [] and doc.invalid == []
    urls = [f.url for f in doc.feeds]
    assert len(urls) >= 20 and len(set(urls)) == len(urls)
    assert all(u.startswith("https://") for u in urls)
    italian = [u for u in urls if ".it/" in u or "corriereobjects.it" in u]
    assert len(italian) >= 10
    assert all(f.category for f in doc.feeds) and all(f.title for f in doc.feeds)
