"""Pure text pieces for feed entries: HTML to text, canonical URLs, dates, language.

Everything here is a pure function of its arguments (the language model is loaded once, on
first use, and only read afterwards), so the parser, ``feeds check`` and the tests share it.
"""

from __future__ import annotations

import html
import re
import threading
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

# --- HTML to text -------------------------------------------------------------------------

# Elements that end a paragraph: their text becomes a paragraph of its own.
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "dd", "details", "div", "dl", "dt",
        "figcaption", "figure", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
        "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "td",
        "tfoot", "th", "thead", "tr", "ul",
    }
)  # fmt: skip
# Elements whose content is never text a reader sees. (Void elements must not be here.)
_SKIP_TAGS = frozenset(
    {
        "script", "style", "noscript", "template", "svg", "math", "iframe", "object", "head",
        "title", "button", "select", "textarea", "video", "audio", "canvas",
    }
)  # fmt: skip
_SPACES = re.compile(r"\s+")
# Control characters and invisible ones (zero-width spaces, BOM, soft hyphen).
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\u2060\ufeff\xad]")

# Trailing boilerplate that feed generators append to every entry.
_BOILERPLATE = re.compile(
    r"^(?:the post .{1,400} appeared first on .{1,200}"
    r"|l'articolo .{1,400} proviene da .{1,200}"
    r"|(?:continue reading|read more|read the full (?:story|article)|leggi (?:tutto|anche|di più)"
    r"|continua a leggere|weiterlesen)\b.{0,120}"
    r"|\[(?:…|\.\.\.)\])$",
    re.IGNORECASE | re.DOTALL,
)
_TRAILING_ELLIPSIS_MARK = re.compile(r"\s*\[(?:…|\.\.\.|&hellip;)\]\s*$")


class _TextExtractor(HTMLParser):
    """Collects visible text as paragraphs; ``<br>`` becomes a line break inside one."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities decoded exactly once, here
        self.paragraphs: list[str] = []
        self._parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag == "br":
            self._parts.append("\n")
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br":
            self._parts.append("\n")
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._parts.append(_SPACES.sub(" ", data))

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        if not self._parts:
            return
        lines = ("".join(self._parts)).split("\n")
        self._parts = []
        text = "\n".join(filter(None, (" ".join(line.split()) for line in lines)))
        if text:
            self.paragraphs.append(text)


def _clean_paragraphs(paragraphs: list[str]) -> str:
    out = [_CONTROL.sub("", p).strip() for p in paragraphs]
    out = [p for p in out if p]
    while out and _BOILERPLATE.match(out[-1]):
        out.pop()
    if out:
        out[-1] = _TRAILING_ELLIPSIS_MARK.sub("…", out[-1]).strip()
    return "\n\n".join(p for p in out if p)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML fragment: one paragraph per block, entities decoded once.

    Scripts, styles and embeds are dropped; ``<br>`` keeps a line break; generator
    boilerplate at the end ("The post … appeared first on …", "Continue reading") is removed.
    """
    if "<" not in markup and "&" not in markup:
        return plain_to_text(markup)
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return _clean_paragraphs(parser.paragraphs)


def plain_to_text(text: str) -> str:
    """Plain text with its paragraphs (blank-line separated) kept and whitespace tidied."""
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _clean_paragraphs([" ".join(b.split()) for b in blocks])


_ENTITY = re.compile(r"&(?:#\d{1,7}|#x[0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_TAG = re.compile(r"<[A-Za-z/!][^>]*>")


def clean_title(value: str, is_html: bool) -> str:
    """A title on one line, with no markup and no leftover entities.

    A plain-text title that still holds an entity (``l&#39;uomo``) was escaped twice by its
    feed; the leftover is decoded so it reads as the publisher meant.
    """
    if is_html or _TAG.search(value):
        value = html_to_text(value)
    if _ENTITY.search(value):
        value = html.unescape(value)
    value = _CONTROL.sub("", value)
    return " ".join(value.split())


# --- URLs ---------------------------------------------------------------------------------

_TRACKING_PARAMS = frozenset(
    {
        "fbclid", "gclid", "dclid", "gbraid", "wbraid", "msclkid", "yclid", "twclid",
        "igshid", "mc_cid", "mc_eid", "_hsenc", "_hsmi", "mkt_tok", "oly_anon_id",
        "oly_enc_id", "vero_id", "_ga", "_gl",
    }
)  # fmt: skip
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_tracking_param(name: str) -> bool:
    key = unquote(name).strip().lower()
    return key.startswith("utm_") or key in _TRACKING_PARAMS


def canonical_url(url: str) -> str | None:
    """The URL two feeds would agree on: scheme and host lower-cased, default port, fragment
    and tracking parameters (``utm_*``, ``fbclid``, ``gclid`` …) removed; other parameters
    keep their order and spelling. None for anything but an absolute http(s) URL.
    """
    url = url.strip()
    if not url or any(c.isspace() for c in url):
        url = "".join(url.split())
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    host = parts.hostname.lower().rstrip(".")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if parts.username or parts.password:
        auth = parts.username or ""
        if parts.password:
            auth += ":" + parts.password
        netloc = f"{auth}@{netloc}"
    query = "&".join(
        piece
        for piece in parts.query.split("&")
        if piece and not is_tracking_param(piece.split("=", 1)[0])
    )
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def absolute_url(link: str | None, base: str | None) -> str | None:
    """``link`` resolved against ``base``, as a canonical http(s) URL, else None."""
    if not link:
        return None
    link = link.strip()
    if base:
        try:
            link = urljoin(base, link)
        except ValueError:
            return None
    return canonical_url(link)


# --- Dates --------------------------------------------------------------------------------

# Month names and abbreviations in the languages of our sources and their neighbours
# (Italian, Portuguese, Spanish, French, German, Dutch). English is feedparser's own job.
_LOCAL_MONTHS: dict[str, int] = {}
for _number, _names in enumerate(
    (
        "gen gennaio ene enero jan janeiro janv janvier januar jänner januari",
        "feb febbraio fev fevereiro febrero févr fevr février fevrier februar februari",
        "mar marzo março marco mars märz maerz mrz maart",
        "apr aprile abr abril avr avril april",
        "mag maggio mai maio may mayo mei",
        "giu giugno jun junho junio juin juni",
        "lug luglio jul julho julio juil juillet juli",
        "ago agosto aoû aou août aout aug augustus",
        "set sett settembre setembro sep sept septiembre septembre september",
        "ott ottobre out outubro oct octubre octobre okt oktober",
        "nov novembre novembro noviembre november",
        "dic dicembre dez dezembro diciembre déc dec décembre decembre dezember december",
    ),
    start=1,
):
    for _name in _names.split():
        _LOCAL_MONTHS[_name] = _number

_ZONES = {
    "z": 0, "ut": 0, "utc": 0, "gmt": 0, "wet": 0, "bst": 60, "cet": 60, "mez": 60,
    "cest": 120, "mesz": 120, "eet": 120, "eest": 180, "msk": 180, "est": -300, "edt": -240,
    "cst": -360, "cdt": -300, "mst": -420, "mdt": -360, "pst": -480, "pdt": -420,
    "brt": -180,
}  # fmt: skip
_LOCAL_DATE = re.compile(
    r"^\s*(?:[^\W\d_]{2,12}\.?,?\s+)?"  # weekday: "Seg,", "lun.", "Mittwoch,"
    r"(?P<day>\d{1,2})\.?\s*(?:de\s+)?"
    r"(?P<month>[^\W\d_]{3,10})\.?,?\s*(?:de\s+)?"
    r"(?P<year>\d{4}),?"
    r"(?:\s*(?:[^\W\d_]{1,5}\s+)?(?P<h>\d{1,2})[:.h](?P<m>\d{2})(?:[:.](?P<s>\d{2}))?)?"
    r"\s*(?P<zone>[+-]\d{2}:?\d{2}|[A-Za-z]{1,5})?\s*$",
    re.UNICODE,
)


def parse_local_date(value: str) -> datetime | None:
    """A date in a non-English RFC-822-like form ("Seg, 24 Set 2018 19:42:40 -0300",
    "lunedì, 6 gennaio 2026 10:00 CET") as an aware UTC datetime; None when not one.
    A missing zone is read as UTC."""
    m = _LOCAL_DATE.match(value)
    if not m:
        return None
    month = _LOCAL_MONTHS.get(m["month"].lower())
    if month is None:
        return None
    offset = 0
    zone = m["zone"]
    if zone:
        if zone[0] in "+-":
            digits = zone[1:].replace(":", "")
            offset = int(digits[:2]) * 60 + int(digits[2:])
            offset = -offset if zone[0] == "-" else offset
        elif zone.lower() in _ZONES:
            offset = _ZONES[zone.lower()]
        else:
            return None
    try:
        local = datetime(
            int(m["year"]),
            month,
            int(m["day"]),
            int(m["h"] or 0),
            int(m["m"] or 0),
            int(m["s"] or 0),
            tzinfo=timezone(timedelta(minutes=offset)),
        )
    except ValueError:
        return None
    return local.astimezone(UTC)


def struct_to_datetime(value: Any) -> datetime | None:
    """feedparser's ``*_parsed`` (a UTC ``time.struct_time``) as an aware datetime."""
    if value is None:
        return None
    try:
        year, month, day, hour, minute, second = (int(v) for v in value[:6])
        return datetime(year, month, day, hour, minute, min(second, 59), tzinfo=UTC)
    except (TypeError, ValueError):
        return None


# --- Language -----------------------------------------------------------------------------

_LANGUAGE_TAG = re.compile(r"^[a-z]{2,3}$")
_identifier_lock = threading.Lock()
_identifier: Any = None


def primary_language(tag: str | None) -> str | None:
    """The primary subtag of a language tag, lower-case ("en-GB" → "en"); None if invalid."""
    if not tag:
        return None
    primary = tag.strip().lower().replace("_", "-").split("-", 1)[0]
    return primary if _LANGUAGE_TAG.match(primary) else None


def _language_identifier() -> Any:
    global _identifier
    with _identifier_lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def detect_language(text: str, *, min_chars: int = 20, min_confidence: float = 0.5) -> str | None:
    """The language of ``text`` by an offline model (py3langid), or None when the text is
    too short or the guess is unsure."""
    sample = text[:2000]
    if len(sample.strip()) < min_chars:
        return None
    lang, confidence = _language_identifier().classify(sample)
    return str(lang) if confidence >= min_confidence else None
