"""Parsing feed documents: feedparser on the fetched bytes and headers, then normalization.

:func:`parse_document` turns a fetched body into a :class:`ParsedFeed` whose entries are clean
(text, not HTML; absolute canonical links; a date and where it came from; a language; a
content hash). It keeps whatever a tolerant parse recovers from an ill-formed document and
reports the problem as a warning; it raises :class:`FeedProblem` only when nothing usable is
there: an HTML page ("not a feed", with the feeds the page links to) or unparseable bytes.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

import feedparser

from collectors.fetch import NOT_A_FEED, PARSE
from collectors.normalize import (
    absolute_url,
    clean_title,
    detect_language,
    html_to_text,
    parse_local_date,
    plain_to_text,
    primary_language,
    struct_to_datetime,
)
from collectors.seeds import content_hash, derive_title

FEED_TYPES = (
    "application/rss+xml",
    "application/atom+xml",
    "application/rdf+xml",
    "application/feed+json",
    "application/json",
)
MAX_GUID_CHARS = 1900
UNTITLED = "(untitled)"
# A date further in the future than this is a publisher's mistake: first-seen is used.
FUTURE_TOLERANCE = timedelta(days=1)

# Where Article.published_at came from.
FROM_ENTRY = "entry"
FROM_UPDATED = "updated"
FROM_FIRST_SEEN = "first_seen"


class FeedProblem(Exception):
    """The document holds nothing usable; ``kind`` is ``not_a_feed`` or ``parse``."""

    def __init__(self, kind: str, message: str, discovered: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.discovered = discovered or []


@dataclass
class ParsedEntry:
    guid: str
    title: str
    url: str | None
    text: str
    published_at: datetime
    published_source: str
    language: str | None
    content_hash: str


@dataclass
class ParsedFeed:
    version: str
    title: str | None = None
    site_url: str | None = None
    language: str | None = None
    ttl_seconds: int | None = None
    entries: list[ParsedEntry] = field(default_factory=list)
    # Problems worth recording on the feed (ill-formed XML, skipped or repeated entries).
    warnings: list[str] = field(default_factory=list)
    # Smaller observations, shown by ``feeds check`` only (no date, no link, …).
    notes: list[str] = field(default_factory=list)
    skipped: int = 0


# --- HTML pages and feed discovery ----------------------------------------------------------

_FEED_ROOT = re.compile(rb"<(?:rss|feed|rdf:RDF|RDF)\b", re.IGNORECASE)
_HTML_START = re.compile(
    rb"^\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*"
    rb"<(?:!doctype\s+html|html|head|body|meta|title|div|p|script|link|style|h1|table)\b",
    re.IGNORECASE | re.DOTALL,
)
_META_CHARSET = re.compile(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_MOVED_LINK = re.compile(r"<a\s[^>]*href\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def _content_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def looks_like_html(body: bytes, headers: Mapping[str, str]) -> bool:
    head = body[:4096].lstrip(b"\xef\xbb\xbf")
    if _FEED_ROOT.search(head):
        return False
    html_types = ("text/html", "application/xhtml+xml")
    return bool(_HTML_START.match(head)) or _content_type(headers) in html_types


def decode_html(body: bytes, headers: Mapping[str, str]) -> str:
    charsets = []
    m = re.search(r"charset=[\"']?([A-Za-z0-9_.:-]+)", headers.get("content-type", ""), re.I)
    if m:
        charsets.append(m.group(1))
    meta = _META_CHARSET.search(body[:4096])
    if meta:
        charsets.append(meta.group(1).decode("ascii", "replace"))
    for charset in [*charsets, "utf-8"]:
        try:
            return body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("utf-8", "replace")


@dataclass(frozen=True)
class DiscoveredFeed:
    url: str
    type: str
    title: str | None


class _LinkFinder(HTMLParser):
    def __init__(self, base: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base = base
        self.found: list[DiscoveredFeed] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k.lower(): (v or "") for k, v in attrs}
        if tag == "base" and values.get("href"):
            self.base = urljoin(self.base, values["href"].strip())
        if tag not in ("link", "a"):
            return
        rels = values.get("rel", "").lower().split()
        kind = values.get("type", "").split(";", 1)[0].strip().lower()
        if "alternate" in rels and kind in FEED_TYPES and values.get("href"):
            url = absolute_url(values["href"], self.base)
            if url and all(f.url != url for f in self.found):
                self.found.append(DiscoveredFeed(url, kind, values.get("title") or None))


def discover_feeds(body: bytes, headers: Mapping[str, str], base_url: str) -> list[DiscoveredFeed]:
    """The feeds an HTML page announces with ``<link rel="alternate" type="…rss+xml|atom+xml">``,
    resolved against the page's URL (or its ``<base href>``), in page order."""
    finder = _LinkFinder(base_url)
    try:
        finder.feed(decode_html(body, headers))
        finder.close()
    except AssertionError:  # pragma: no cover - HTMLParser on hopeless markup
        pass
    return finder.found


def _html_title(text: str) -> str | None:
    m = _HTML_TITLE.search(text)
    return " ".join(html_to_text(m.group(1)).split()) if m else None


def _not_a_feed(body: bytes, headers: Mapping[str, str], url: str) -> FeedProblem:
    text = decode_html(body, headers)
    title = _html_title(text[:20000])
    discovered = [f.url for f in discover_feeds(body, headers, url)]
    message = f"{url} is an HTML page, not a feed"
    if title:
        message += f" (page title “{title}”)"
    if discovered:
        message += "; the page links to the feed(s) " + ", ".join(discovered)
    elif re.search(r"\bmoved\b", text[:4000], re.IGNORECASE):
        target = _MOVED_LINK.search(text[:4000])
        if target and (moved := absolute_url(html.unescape(target.group(1)), url)):
            message += f"; it says the document moved, to {moved}"
    return FeedProblem(NOT_A_FEED, message, discovered)


# --- Entity expansion ---------------------------------------------------------------------

# A document's internal DTD may declare entities, and expanding them is how a few kilobytes
# become gigabytes: nested ("billion laughs") or one large entity referenced many times.
# feedparser's tolerant fallback parser expands simple entities without any limit, so a
# document whose declared entities would expand past this many characters is refused first.
MAX_ENTITY_EXPANSION = 1_000_000
_ENTITY_DECL = re.compile(
    r"<!ENTITY\s+(%\s*)?([^\s\"'%&;<>]+)\s+(?:\"([^\"]*)\"|'([^']*)'|(SYSTEM|PUBLIC))"
)
_ENTITY_REF = re.compile(r"&([^\s&;<>#]+);")


def _xml_codec(body: bytes) -> str:
    """The byte layout of an XML document's markup, from its BOM or first characters."""
    head = body[:4]
    for bom, codec in (
        (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"),
        (b"<\x00\x00\x00", "utf-32-le"), (b"\x00\x00\x00<", "utf-32-be"),
        (b"<\x00", "utf-16-le"), (b"\x00<", "utf-16-be"),
    ):  # fmt: skip
        if head.startswith(bom):
            return codec
    return "latin-1"  # ASCII-compatible encodings: markup bytes are the characters


def entity_expansion(body: bytes) -> tuple[int, bool]:
    """How many characters the document's declared entities would expand to (capped just
    past :data:`MAX_ENTITY_EXPANSION`), and whether it declares parameter entities."""
    codec = _xml_codec(body)
    if "<!ENTITY".encode(codec) not in body:
        return 0, False
    text = body.decode(codec, "replace")
    limit = MAX_ENTITY_EXPANSION + 1
    sizes: dict[str, int] = {}
    inside: Counter[str] = Counter()  # references made by the declarations themselves
    parameter = False
    for m in _ENTITY_DECL.finditer(text):
        if m.group(1) is not None:
            parameter = True
            continue
        value = m.group(3) if m.group(3) is not None else (m.group(4) or "")
        size = len(value)
        for ref in _ENTITY_REF.finditer(value):
            inside[ref.group(1)] += 1
            if ref.group(1) in sizes:
                size += sizes[ref.group(1)] - len(ref.group(0))
        sizes.setdefault(m.group(2), min(size, limit))
    total = 0
    refs = Counter(r.group(1) for r in _ENTITY_REF.finditer(text) if r.group(1) in sizes)
    for name, count in refs.items():
        total = min(total + max(count - inside[name], 0) * sizes[name], limit)
    return total, parameter


def _check_entities(body: bytes, url: str) -> None:
    expansion, parameter = entity_expansion(body)
    if parameter:
        raise FeedProblem(
            PARSE, f"{url} declares XML parameter entities: refused (feeds never need them)"
        )
    if expansion > MAX_ENTITY_EXPANSION:
        raise FeedProblem(
            PARSE,
            f"{url} declares XML entities that would expand to more than "
            f"{MAX_ENTITY_EXPANSION:,} characters: refused (an entity-expansion attack, "
            'such as "billion laughs")',
        )


# --- Feeds --------------------------------------------------------------------------------


def _describe_bozo(exc: Any) -> str:
    name = type(exc).__name__
    if name == "CharacterEncodingOverride":
        return f"encoding: {exc}"
    if name == "NonXMLContentType":
        return f"content type: {exc}"
    line = getattr(exc, "getLineNumber", None)
    message = exc.getMessage() if hasattr(exc, "getMessage") else str(exc)
    if callable(line):
        return f"ill-formed XML at line {line()}: {message}"
    return f"ill-formed document: {message or name}"


def _feedparser_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers for feedparser. ``text/xml`` without a charset is read by its XML
    declaration (as browsers and the best readers do), not as US-ASCII per RFC 3023."""
    out = {k.lower(): v for k, v in headers.items() if k.lower() in ("content-type",)}
    ctype = out.get("content-type", "")
    if ctype and "charset" not in ctype.lower() and _content_type(out).startswith("text/"):
        out["content-type"] = "application/xml"
    return out


@dataclass
class _Context:
    base: str
    feed_language: str | None
    now: datetime
    max_text_chars: int
    notes: dict[str, int] = field(default_factory=dict)
    bad_dates: list[str] = field(default_factory=list)

    def note(self, key: str) -> None:
        self.notes[key] = self.notes.get(key, 0) + 1


def parse_document(
    body: bytes,
    headers: Mapping[str, str],
    url: str,
    now: datetime,
    *,
    max_text_chars: int = 100_000,
) -> ParsedFeed:
    """Parse a fetched feed body into clean entries; raise :class:`FeedProblem` if none can be."""
    if not body.strip():
        raise FeedProblem(NOT_A_FEED, f"{url} answered with an empty body, not a feed")
    stripped = body.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] in (b"{", b"["):
        return _parse_json_feed(stripped, headers, url, now, max_text_chars)
    if looks_like_html(body, headers):
        raise _not_a_feed(body, headers, url)
    _check_entities(body, url)
    try:
        d = feedparser.parse(
            body,
            response_headers=_feedparser_headers(headers),
            sanitize_html=False,  # the text is extracted below; no HTML is kept
            resolve_relative_uris=False,  # links are resolved below, against the right base
        )
    except Exception as exc:  # feedparser recovers from nearly anything; this is the rest
        message = f"{url} could not be parsed: {type(exc).__name__}: {exc}"
        raise FeedProblem(PARSE, message) from exc
    version = str(d.get("version") or "")
    if not version and not d.entries:
        if d.get("bozo"):
            raise FeedProblem(
                PARSE,
                f"{url} could not be parsed as RSS/Atom/RDF: {_describe_bozo(d.bozo_exception)}",
            )
        ctype = headers.get("content-type") or "no content type"
        raise FeedProblem(NOT_A_FEED, f"{url} is not an RSS, Atom or RDF feed ({ctype})")

    meta = d.feed
    site = meta.get("link")
    site_url = absolute_url(site, url) if site else None
    feed_language = primary_language(meta.get("language")) or primary_language(
        headers.get("content-language", "").split(",")[0]
    )
    parsed = ParsedFeed(
        version=version or "unknown",
        title=clean_title(meta.get("title", ""), _is_html(meta.get("title_detail"))) or None,
        site_url=site_url,
        language=feed_language,
        ttl_seconds=_ttl_seconds(meta.get("ttl")),
    )
    if d.get("bozo"):
        parsed.warnings.append(_describe_bozo(d.bozo_exception))
    ctx = _Context(
        base=site_url or url, feed_language=feed_language, now=now, max_text_chars=max_text_chars
    )
    seen: set[str] = set()
    repeated = 0
    for raw in d.entries:
        entry = _entry(raw, ctx)
        if entry is None:
            parsed.skipped += 1
            continue
        if entry.guid in seen:
            repeated += 1
            continue
        seen.add(entry.guid)
        parsed.entries.append(entry)
    _summarise(parsed, ctx, repeated)
    return parsed


def _summarise(parsed: ParsedFeed, ctx: _Context, repeated: int) -> None:
    if parsed.skipped:
        parsed.warnings.append(
            f"{parsed.skipped} empty entr{'y' if parsed.skipped == 1 else 'ies'} "
            "(no id, title, link or text) skipped"
        )
    if repeated:
        parsed.warnings.append(
            f"{repeated} {'entry repeats' if repeated == 1 else 'entries repeat'} "
            "an earlier entry's id: kept the first"
        )
    if ctx.bad_dates:
        sample = ", ".join(repr(v) for v in ctx.bad_dates[:3])
        count = len(ctx.bad_dates)
        parsed.warnings.append(
            f"{count} {'entry has' if count == 1 else 'entries have'} a date that cannot be "
            f"read ({sample}): first-seen time used"
        )
    labels = {
        "no_title": "no title (derived from the text or link)",
        "no_link": "no web link",
        "no_date": "no date (first-seen time used)",
        "updated_date": "only an updated date (used as published)",
        "future_date": "a date in the future (first-seen time used)",
        "local_date": "a non-English date (read by the localized date parser)",
        "detected_language": "no declared language (detected from the text)",
    }
    for key, label in labels.items():
        count = ctx.notes.get(key, 0)
        if count:
            parsed.notes.append(f"{count} {'entry has' if count == 1 else 'entries have'} {label}")


def _is_html(detail: Any) -> bool:
    return bool(detail) and "html" in str(detail.get("type", ""))


def _ttl_seconds(value: Any) -> int | None:
    try:
        minutes = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return minutes * 60 if minutes > 0 else None


def _text_of(detail: Any) -> str:
    value = detail.get("value") or ""
    return html_to_text(value) if _is_html(detail) or "<" in value else plain_to_text(value)


def _entry(e: Any, ctx: _Context) -> ParsedEntry | None:
    # Text: the longest rendering among the content bodies and the summary.
    candidates = [c for c in e.get("content", []) if c.get("value")]
    summary = e.get("summary_detail")
    if summary and summary.get("value"):
        candidates.append(summary)
    elif e.get("summary"):
        candidates.append({"value": e.summary, "type": "text/html"})
    text = max((_text_of(c) for c in candidates), key=len, default="")
    if len(text) > ctx.max_text_chars:
        text = text[: ctx.max_text_chars].rsplit(" ", 1)[0] + " …"

    link = _link(e, ctx.base)
    raw_id = str(e.get("id") or "").strip()
    if not link and raw_id and e.get("guidislink", raw_id.startswith("http")):
        link = absolute_url(raw_id, ctx.base)
    title = clean_title(e.get("title", ""), _is_html(e.get("title_detail")))
    if not (raw_id or title or link or text):
        return None
    if not title:
        ctx.note("no_title")
        title = derive_title(text) if text else (link or UNTITLED)
    if not link:
        ctx.note("no_link")

    guid = raw_id or link or "title:" + hashlib.sha256(f"{title}\n{text}".encode()).hexdigest()
    if len(guid) > MAX_GUID_CHARS:
        guid = "sha256:" + hashlib.sha256(guid.encode("utf-8")).hexdigest()

    published_at, source = _published(e, ctx)
    language = (
        primary_language(_detail_language(e))
        or ctx.feed_language
        or detect_language(f"{title}\n{text}")
    )
    if language and not ctx.feed_language and not _detail_language(e):
        ctx.note("detected_language")
    return ParsedEntry(
        guid=guid,
        title=title,
        url=link,
        text=text,
        published_at=published_at,
        published_source=source,
        language=language,
        content_hash=content_hash(title, text),
    )


def _detail_language(e: Any) -> str | None:
    for key in ("title_detail", "summary_detail"):
        detail = e.get(key)
        if detail and detail.get("language"):
            return str(detail["language"])
    for c in e.get("content", []):
        if c.get("language"):
            return str(c["language"])
    return None


def _link(e: Any, base: str) -> str | None:
    # Feeds behind FeedBurner carry the publisher's own URL beside the redirector's.
    for candidate in (e.get("feedburner_origlink"), e.get("link")):
        url = absolute_url(candidate, base) if candidate else None
        if url:
            return url
    for link in e.get("links", []):
        if link.get("rel", "alternate") == "alternate" and link.get("href"):
            url = absolute_url(link["href"], base)
            if url:
                return url
    return None


def _published(e: Any, ctx: _Context) -> tuple[datetime, str]:
    for key, source in (("published", FROM_ENTRY), ("updated", FROM_UPDATED)):
        when = struct_to_datetime(e.get(f"{key}_parsed"))
        raw = e.get(key)
        if when is None and raw:
            when = parse_local_date(str(raw))
            if when is not None:
                ctx.note("local_date")
            else:
                ctx.bad_dates.append(str(raw)[:60])
                continue
        if when is None:
            continue
        if when > ctx.now + FUTURE_TOLERANCE:
            ctx.note("future_date")
            return ctx.now, FROM_FIRST_SEEN
        if source == FROM_UPDATED:
            ctx.note("updated_date")
        return when, source
    ctx.note("no_date")
    return ctx.now, FROM_FIRST_SEEN


# --- JSON Feed ----------------------------------------------------------------------------


def _parse_json_feed(
    body: bytes, headers: Mapping[str, str], url: str, now: datetime, max_text_chars: int
) -> ParsedFeed:
    try:
        doc = json.loads(body.decode("utf-8-sig", "replace"))
    except ValueError as exc:
        raise FeedProblem(NOT_A_FEED, f"{url} sent JSON that does not parse: {exc}") from exc
    if not isinstance(doc, dict) or "jsonfeed.org" not in str(doc.get("version", "")):
        raise FeedProblem(NOT_A_FEED, f"{url} sent JSON that is not a JSON Feed")
    site_url = absolute_url(doc.get("home_page_url"), url)
    feed_language = primary_language(doc.get("language"))
    parsed = ParsedFeed(
        version="json" + str(doc["version"]).rstrip("/").rsplit("/", 1)[-1].replace(".", ""),
        title=clean_title(str(doc.get("title") or ""), False) or None,
        site_url=site_url,
        language=feed_language,
    )
    ctx = _Context(site_url or url, feed_language, now, max_text_chars)
    seen: set[str] = set()
    for item in doc.get("items") or []:
        if not isinstance(item, dict):
            parsed.skipped += 1
            continue
        e: dict[str, Any] = {
            "id": str(item.get("id") or ""),
            "link": item.get("url") or item.get("external_url"),
            "title": str(item.get("title") or ""),
            "title_detail": {"type": "text/plain", "language": item.get("language")},
        }
        if item.get("content_html"):
            e["content"] = [{"value": item["content_html"], "type": "text/html"}]
        elif item.get("content_text"):
            e["content"] = [{"value": item["content_text"], "type": "text/plain"}]
        if item.get("summary"):
            e["summary_detail"] = {"value": str(item["summary"]), "type": "text/plain"}
        for key, src in (("published", "date_published"), ("updated", "date_modified")):
            if item.get(src):
                e[key] = str(item[src])
                e[f"{key}_parsed"] = _iso_struct(str(item[src]))
        entry = _entry(e, ctx)
        if entry is None:
            parsed.skipped += 1
        elif entry.guid not in seen:
            seen.add(entry.guid)
            parsed.entries.append(entry)
    _summarise(parsed, ctx, 0)
    return parsed


def _iso_struct(value: str) -> Any:
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).timetuple()
