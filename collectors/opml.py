"""OPML subscription lists: read (nested outlines, categories) and write (OPML 2.0).

Reading is tolerant like feed reading: a file that is not well-formed XML (an unescaped
``&`` in a title is common in exported lists) is read outline by outline instead of being
refused, and the problem is reported.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import format_datetime
from xml.sax.saxutils import quoteattr

from collectors.normalize import canonical_url


class OpmlError(ValueError):
    """The file holds no outline at all; the message names the file."""


@dataclass(frozen=True)
class OpmlFeed:
    url: str
    title: str | None = None
    site_url: str | None = None
    category: str | None = None


@dataclass
class OpmlDocument:
    title: str | None
    feeds: list[OpmlFeed] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # outlines with an unusable xmlUrl
    warnings: list[str] = field(default_factory=list)


_OUTLINE = re.compile(r"<outline\b([^>]*)>", re.IGNORECASE | re.DOTALL)
_ATTR = re.compile(r"([A-Za-z_:][\w:.-]*)\s*=\s*(\"[^\"]*\"|'[^']*')", re.DOTALL)


def _attr(attrs: dict[str, str], *names: str) -> str | None:
    lowered = {k.lower(): v for k, v in attrs.items()}
    for name in names:
        value = lowered.get(name.lower())
        if value and value.strip():
            return " ".join(value.split())
    return None


def _feed_of(attrs: dict[str, str], category: str | None, doc: OpmlDocument) -> None:
    url = _attr(attrs, "xmlUrl", "xmlurl")
    if url is None and (_attr(attrs, "type") or "").lower() in ("rss", "atom"):
        url = _attr(attrs, "url")
    if url is None:
        return
    clean = canonical_url(url)
    if clean is None:
        doc.invalid.append(url)
        return
    # Feed URLs keep their query as given (a token may look like a tracking parameter).
    if "?" in url and "?" not in clean:
        clean = clean + "?" + url.split("?", 1)[1].split("#", 1)[0]
    if any(f.url == clean for f in doc.feeds):
        return
    doc.feeds.append(
        OpmlFeed(
            url=clean,
            title=_attr(attrs, "title", "text"),
            site_url=canonical_url(_attr(attrs, "htmlUrl") or "") or None,
            category=category,
        )
    )


def _walk(element: ET.Element, path: list[str], doc: OpmlDocument) -> None:
    for child in element:
        if child.tag.lower().rsplit("}", 1)[-1] != "outline":
            continue
        attrs = dict(child.attrib)
        _feed_of(attrs, "/".join(path) or None, doc)
        label = _attr(attrs, "text", "title")
        _walk(child, [*path, label] if label and not _attr(attrs, "xmlUrl") else path, doc)


def read_opml(data: bytes, source: str) -> OpmlDocument:
    """Every feed of an OPML document (nested outlines; a parent's text is the category)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        return _read_loosely(data, source, f"{source} is not well-formed XML ({exc})")
    head_title = root.findtext("head/title")
    doc = OpmlDocument(title=head_title.strip() if head_title else None)
    body = root.find("body")
    if root.tag.lower() != "opml" or body is None:
        raise OpmlError(f"{source} is not an OPML document (root <{root.tag}>, no <body>)")
    _walk(body, [], doc)
    return doc


def _read_loosely(data: bytes, source: str, problem: str) -> OpmlDocument:
    text = data.decode("utf-8", "replace")
    outlines = _OUTLINE.findall(text)
    if not outlines:
        raise OpmlError(f"{problem}; no <outline> found")
    m = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    doc = OpmlDocument(title=html.unescape(m.group(1)).strip() if m else None)
    doc.warnings.append(f"{problem}: read outline by outline")
    for raw in outlines:
        attrs = {k: html.unescape(v[1:-1]) for k, v in _ATTR.findall(raw)}
        _feed_of(attrs, None, doc)
    return doc


def write_opml(feeds: Iterable[OpmlFeed], *, title: str, now: datetime) -> str:
    """An OPML 2.0 document listing ``feeds``, grouped by category when they have one."""
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<opml version="2.0">',
        "  <head>",
        f"    <title>{html.escape(title, quote=False)}</title>",
        f"    <dateCreated>{format_datetime(now, usegmt=True)}</dateCreated>",
        "  </head>",
        "  <body>",
    ]
    groups: dict[str | None, list[OpmlFeed]] = {}
    for feed in feeds:
        groups.setdefault(feed.category, []).append(feed)

    def outline(feed: OpmlFeed, indent: str) -> str:
        label = feed.title or feed.url
        attrs = f'type="rss" text={quoteattr(label)} title={quoteattr(label)}'
        attrs += f" xmlUrl={quoteattr(feed.url)}"
        if feed.site_url:
            attrs += f" htmlUrl={quoteattr(feed.site_url)}"
        return f"{indent}<outline {attrs}/>"

    for category, members in groups.items():
        if category is None:
            lines.extend(outline(f, "    ") for f in members)
            continue
        lines.append(f"    <outline text={quoteattr(category)} title={quoteattr(category)}>")
        lines.extend(outline(f, "      ") for f in members)
        lines.append("    </outline>")
    lines += ["  </body>", "</opml>", ""]
    return "\n".join(lines)
