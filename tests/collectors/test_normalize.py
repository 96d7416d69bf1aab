"""The pure text pieces: HTML to text, titles, canonical URLs, dates, language, parsing."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from collectors.normalize import (
    absolute_url,
    canonical_url,
    clean_title,
    detect_language,
    html_to_text,
    parse_local_date,
    primary_language,
)
from collectors.parse import FeedProblem, discover_feeds, parse_document
from tests.collectors.conftest import DATA, START


def test_html_to_text_keeps_paragraphs_and_decodes_entities_once() -> None:
    markup = (
        "<div><p>Il ministro ha detto: &laquo;Nessun invio&raquo; &amp; basta.</p>"
        "<p>Seconda <b>frase</b>,\n  su due righe.<br>Dopo un a capo.</p>"
        "<script>var x = '<p>no</p>';</script><style>p{}</style>"
        "<ul><li>uno</li><li>due</li></ul>"
        "<p>&amp;lt;non un tag&amp;gt;</p></div>"
    )
    assert html_to_text(markup) == (
        "Il ministro ha detto: «Nessun invio» & basta.\n\n"
        "Seconda frase, su due righe.\nDopo un a capo.\n\n"
        "uno\n\ndue\n\n"
        "&lt;non un tag&gt;"  # escaped twice in the source: decoded once, as written
    )


def test_html_to_text_drops_generator_boilerplate() -> None:
    markup = (
        "<p>Il testo.</p><p>The post <a href='/x'>Titolo</a> appeared first on "
        "<a href='/'>Sito</a>.</p>"
    )
    assert html_to_text(markup) == "Il testo."
    assert html_to_text("<p>Un riassunto [&#8230;]</p>") == "Un riassunto…"
    assert html_to_text("<p>Intro</p><p>Continue reading...</p>") == "Intro"


def test_plain_text_keeps_blank_line_paragraphs() -> None:
    assert html_to_text("First line\nsame paragraph.\n\n  Second\tone. ") == (
        "First line same paragraph.\n\nSecond one."
    )


@pytest.mark.parametrize(
    ("raw", "is_html", "clean"),
    [
        ("l&#39;uomo accusato", False, "l'uomo accusato"),  # escaped twice by the feed
        ("AT&amp;T and  Nokia\n", False, "AT&T and Nokia"),
        ("A <em>bold</em> move", True, "A bold move"),
        ("Tom & Jerry", False, "Tom & Jerry"),
        ("  Spazi\u200b invisibili ", False, "Spazi invisibili"),
    ],
)
def test_clean_title(raw: str, is_html: bool, clean: str) -> None:
    assert clean_title(raw, is_html) == clean


@pytest.mark.parametrize(
    ("url", "canonical"),
    [
        (
            "HTTPS://Example.COM:443/a/b?utm_source=rss&id=3&fbclid=X&gclid=Y#frag",
            "https://example.com/a/b?id=3",
        ),
        ("http://example.com:80", "http://example.com/"),
        ("http://example.com:8080/x?UTM_Medium=a&q=1&q=2", "http://example.com:8080/x?q=1&q=2"),
        ("https://example.com/p?mc_cid=1&msclkid=2", "https://example.com/p"),
        (" https://example.com/spaced path ", "https://example.com/spacedpath"),
        ("mailto:someone@example.com", None),
        ("tag:github.com,2008:Repository/1", None),
        ("/relative/only", None),
    ],
)
def test_canonical_url(url: str, canonical: str | None) -> None:
    assert canonical_url(url) == canonical


def test_absolute_url_resolves_against_a_base() -> None:
    base = "https://news.example.it/esteri/index.html"
    assert absolute_url("../politica/a.html?utm_campaign=x", base) == (
        "https://news.example.it/politica/a.html"
    )
    assert absolute_url("//cdn.example.it/x", base) == "https://cdn.example.it/x"
    assert absolute_url(None, base) is None


@pytest.mark.parametrize(
    ("raw", "when"),
    [
        ("Seg, 24 Set 2018 19:42:40 -0300", datetime(2018, 9, 24, 22, 42, 40, tzinfo=UTC)),
        ("lun, 06 gen 2026 10:15:00 +0100", datetime(2026, 1, 6, 9, 15, tzinfo=UTC)),
        ("martedì, 6 gennaio 2026 10:15 CET", datetime(2026, 1, 6, 9, 15, tzinfo=UTC)),
        ("Mi, 3. Okt 2018 10:00:00 MESZ", datetime(2018, 10, 3, 8, 0, tzinfo=UTC)),
        ("12 de março de 2025 08:30", datetime(2025, 3, 12, 8, 30, tzinfo=UTC)),
        ("jeu., 5 déc. 2024 18:00:00 +0100", datetime(2024, 12, 5, 17, 0, tzinfo=UTC)),
    ],
)
def test_localized_dates(raw: str, when: datetime) -> None:
    assert parse_local_date(raw) == when


@pytest.mark.parametrize("raw", ["", "yesterday", "31 Foo 2020 10:00", "30 feb 2024 10:00"])
def test_unreadable_dates(raw: str) -> None:
    assert parse_local_date(raw) is None


def test_language_detection_and_tags() -> None:
    assert (
        detect_language(
            "Il governo italiano non invierà truppe, ma sosterrà la missione di monitoraggio."
        )
        == "it"
    )
    assert (
        detect_language("The coalition agreed on a command structure for the reassurance force.")
        == "en"
    )
    assert detect_language("Ok") is None
    assert primary_language("it-IT") == "it" and primary_language("en_GB") == "en"
    assert primary_language("x") is None and primary_language(None) is None


def test_html_page_discovery_resolves_links() -> None:
    page = (DATA / "page_with_feed.html").read_bytes()
    found = discover_feeds(
        page, {"content-type": "text/html"}, "https://notizie.example.it/esteri/"
    )
    assert [(f.url, f.type) for f in found] == [
        ("https://notizie.example.it/feeds/esteri.xml", "application/rss+xml"),
        ("https://wire.example.com/europe/atom.xml", "application/atom+xml"),
    ]
    assert found[0].title == "Esteri (RSS)"
    with pytest.raises(FeedProblem) as problem:
        parse_document(
            page, {"content-type": "text/html"}, "https://notizie.example.it/esteri/", START
        )
    assert problem.value.kind == "not_a_feed"
    assert problem.value.discovered[0] == "https://notizie.example.it/feeds/esteri.xml"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"", "not_a_feed"),
        (b"   \n", "not_a_feed"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "parse"),
        (b'{"hello": "world"}', "not_a_feed"),
        (b"<?xml version='1.0'?><note><to>x</to></note>", "not_a_feed"),
    ],
)
def test_unusable_documents_raise_a_clear_problem(body: bytes, kind: str) -> None:
    with pytest.raises(FeedProblem) as problem:
        parse_document(body, {}, "https://x.example/feed", START)
    assert problem.value.kind == kind and "https://x.example/feed" in problem.value.message


def test_json_feed_is_read() -> None:
    body = (
        b'{"version": "https://jsonfeed.org/version/1.1", "title": "JSON wire",'
        b' "home_page_url": "https://json.example.org/", "language": "en-US", "items": ['
        b'{"id": "1", "url": "/a?utm_source=x", "title": "Ceasefire talks resume",'
        b' "content_html": "<p>Talks resume in Geneva.</p><p>More soon.</p>",'
        b' "date_published": "2026-01-05T10:00:00Z"},'
        b'{"id": "2", "content_text": "No title here, only a short text about sanctions."}]}'
    )
    parsed = parse_document(
        body, {"content-type": "application/feed+json"}, "https://json.example.org/feed.json", START
    )
    assert parsed.version == "json11" and parsed.title == "JSON wire" and parsed.language == "en"
    first, second = parsed.entries
    assert (
        first.url == "https://json.example.org/a"
        and first.text == "Talks resume in Geneva.\n\nMore soon."
    )
    assert first.published_at == datetime(2026, 1, 5, 10, tzinfo=UTC)
    assert second.title.startswith("No title here") and second.published_source == "first_seen"


def test_future_dates_fall_back_to_first_seen() -> None:
    body = (
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>'
        b"<item><guid>a</guid><title>From the future</title>"
        b"<pubDate>Wed, 01 Jan 2031 10:00:00 GMT</pubDate></item></channel></rss>"
    )
    (entry,) = parse_document(body, {}, "https://x.example/f", START).entries
    assert entry.published_at == START and entry.published_source == "first_seen"
