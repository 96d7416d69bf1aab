"""Seed articles: plain-text files in a folder, each one article as a scraper left it.

The first line is the title where it looks like one; otherwise a short title is derived from
the first sentence. Scraper leftovers are removed by general rules (embedded tweets, "read
more" buttons, "recommended stories" widgets, a trailing lone word such as "Today", photo
captions glued between paragraphs), never by per-file lists. A publication date is taken only
where the text states one ("Pubblicato il 6 gennaio 2026"); otherwise it stays empty.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from sqlmodel import Session, select

from storage.db import serialize
from storage.models import Article

log = logging.getLogger(__name__)

SEED_SUFFIXES = (".txt",)
TITLE_MAX_CHARS = 300
DERIVED_TITLE_WORDS = 14
TWEET_MAX_CHARS = 280

_MONTHS = {
    # Italian
    "gennaio": 1, "febbraio": 2, "marzo": 3, "aprile": 4, "maggio": 5, "giugno": 6,
    "luglio": 7, "agosto": 8, "settembre": 9, "ottobre": 10, "novembre": 11, "dicembre": 12,
    # English
    "january": 1, "february": 2, "march": 3, "april": 4, "may": 5, "june": 6, "july": 7,
    "august": 8, "september": 9, "october": 10, "november": 11, "december": 12,
}  # fmt: skip
_MONTH_RE = "|".join(_MONTHS)

# "Pubblicato il 6 gennaio 2026", "Aggiornato il 6 gennaio 2026", "Published on 6 January 2026",
# "Published January 6, 2026" — a line that is only a dateline.
_DATELINE = re.compile(
    rf"^\s*(?P<verb>pubblicato|published|aggiornato|updated)(?:\s+(?:il|on|:))?\s+"
    rf"(?:(?P<d1>\d{{1,2}})\s+(?P<m1>{_MONTH_RE})\s+(?P<y1>\d{{4}})"
    rf"|(?P<m2>{_MONTH_RE})\s+(?P<d2>\d{{1,2}}),?\s+(?P<y2>\d{{4}})"
    rf"|(?P<d3>\d{{1,2}})[/.](?P<m3>\d{{1,2}})[/.](?P<y3>\d{{4}}))"
    rf"(?:\s*[,-–]?\s*(?:alle\s+|at\s+)?\d{{1,2}}[:.]\d{{2}})?\s*$",
    re.IGNORECASE,
)

# An embedded tweet as scrapers flatten it: "<text> pic.twitter.com/xyz— Name (@handle) April
# 10, 2025", usually glued to the sentences around it with no space.
_TWEET_TAIL = re.compile(
    rf"(?:\s*pic\.twitter\.com/\w+|\s*https?://t\.co/\w+)*\s*[—–-]\s*[^()\n]{{1,80}}"
    rf"\(@\w{{1,30}}\)\s+(?:{_MONTH_RE})\s+\d{{1,2}},\s+\d{{4}}",
    re.IGNORECASE,
)
_TWEET_LINK = re.compile(r"\s*pic\.twitter\.com/\w+", re.IGNORECASE)
# A photo caption glued between paragraphs: "...Kaja Kallas (foto: European Council)".
_CAPTION_TAIL = re.compile(r"\((?:foto|photo|ph\.|credit|fonte foto)\s*:[^()\n]{1,80}\)", re.I)
# Buttons and widgets.
_READ_MORE = re.compile(
    r"\s*\b(?:LEGGI TUTTO|LEGGI ANCHE|CONTINUA A LEGGERE|READ MORE|CONTINUE READING)\b\s*$"
)
_WIDGET_HEAD = re.compile(
    r"^\s*(?:storie consigliate|articoli correlati|potrebbe interessarti|leggi anche|"
    r"recommended stories|related stories|related articles|more stories)\s*:?\s*$",
    re.IGNORECASE,
)
_LIST_WIDGET = re.compile(
    r"^\s*(?:elenco di \d+ element[io].*fine dell.elenco|list of \d+ items.*end of list)\s*$",
    re.IGNORECASE,
)
# A lone navigation/timestamp word left at the end of a page.
_LONE_TRAILER = re.compile(
    r"^\s*(?:today|oggi|ieri|yesterday|advertisement|pubblicità|share|condividi)\s*$",
    re.IGNORECASE,
)
# A paragraph break the scraper lost: sentence end (after a lower-case letter or a closing
# quote) immediately followed by an upper-case letter.
_GLUED_BREAK = re.compile(
    r"(?<=[a-zà-ÿ0-9”\"»’)][.!?])(?=[A-ZÀ-Ý][a-zà-ÿ’'])|(?<=[.!?][”\"»])(?=[A-ZÀ-Ý])"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[”\"»]?\s+(?=[A-ZÀ-Ý“\"«])")


@dataclass(frozen=True)
class SeedArticle:
    name: str
    title: str
    text: str
    published_at: datetime | None
    language: str
    content_hash: str

    @property
    def uid(self) -> str:
        return f"seed:{self.name}"


def content_hash(title: str, text: str) -> str:
    """A hash of the normalized content: case, accents and whitespace do not change it."""
    folded = unicodedata.normalize("NFKC", f"{title}\n{text}").casefold()
    folded = re.sub(r"\s+", " ", folded).strip()
    return hashlib.sha256(folded.encode("utf-8")).hexdigest()


def parse_dateline(line: str) -> date | None:
    """The date of a dateline such as "Pubblicato il 6 gennaio 2026", else None."""
    m = _DATELINE.match(line)
    if not m:
        return None
    try:
        if m["d1"]:
            return date(int(m["y1"]), _MONTHS[m["m1"].lower()], int(m["d1"]))
        if m["d2"]:
            return date(int(m["y2"]), _MONTHS[m["m2"].lower()], int(m["d2"]))
        return date(int(m["y3"]), int(m["m3"]), int(m["d3"]))
    except ValueError:
        return None


def _remove_embeds(text: str) -> str:
    """Remove flattened tweets and photo captions, with the glued sentence they belong to."""
    for pattern, budget in ((_TWEET_TAIL, TWEET_MAX_CHARS), (_CAPTION_TAIL, 0)):
        while True:
            m = pattern.search(text)
            if not m:
                break
            start = m.start()
            # The embed began at a glued paragraph break before it: the nearest one for a
            # caption; for a tweet, the earliest that keeps the tweet within its length limit.
            line_start = text.rfind("\n", 0, start) + 1
            breaks = [b.start() for b in _GLUED_BREAK.finditer(text, line_start, start)]
            begin = breaks[-1] if breaks else line_start
            for b in reversed(breaks[:-1]):
                if start - b > budget:
                    break
                begin = b
            text = text[:begin] + "\n" + text[m.end() :]
    return _TWEET_LINK.sub("", text)


def _split_glued(paragraph: str) -> list[str]:
    return [p.strip() for p in _GLUED_BREAK.split(paragraph) if p.strip()]


def clean_body(lines: list[str]) -> tuple[list[str], date | None]:
    """Paragraphs with leftovers removed, and the dateline's date if one was found."""
    published: date | None = None
    text = _remove_embeds("\n".join(lines))
    paragraphs: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        found = parse_dateline(line)
        if found is not None:
            published = published or found
            continue
        if _WIDGET_HEAD.match(line) or _LIST_WIDGET.match(line):
            continue
        line = _READ_MORE.sub("", line).strip()
        if line:
            paragraphs.extend(_split_glued(line))
    while paragraphs and _LONE_TRAILER.match(paragraphs[-1]):
        paragraphs.pop()
    return paragraphs, published


def derive_title(text: str, max_words: int = DERIVED_TITLE_WORDS) -> str:
    """A short title from the first sentence: whole words, an ellipsis when cut."""
    first = _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()
    words = first.split()
    if len(words) <= max_words:
        return first.rstrip(".")
    cut = " ".join(words[:max_words]).rstrip(",;:–-")
    return cut + "…"


def parse_seed(path: Path) -> SeedArticle:
    """Turn one seed file into a :class:`SeedArticle`."""
    raw = path.read_text(encoding="utf-8-sig")
    lines = [line.rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        raise ValueError(f"seed {path}: the file is empty")
    first = lines[0].strip()
    rest = lines[1:]
    has_title = bool([r for r in rest if r.strip()]) and len(first) <= TITLE_MAX_CHARS
    if has_title:
        # A title line may carry a standfirst after its first sentence: keep that in the body.
        parts = _SENTENCE_END.split(first, maxsplit=1)
        title = parts[0].strip()
        if title.endswith("."):
            title = title[:-1]
        body_lines = ([parts[1]] if len(parts) > 1 else []) + rest
    else:
        body_lines = lines
        title = ""
    paragraphs, published = clean_body(body_lines)
    if not paragraphs:
        raise ValueError(f"seed {path}: no text left after cleaning")
    text = "\n\n".join(paragraphs)
    if not title:
        title = derive_title(paragraphs[0])
    published_at = (
        datetime(published.year, published.month, published.day, tzinfo=UTC)
        if (published)
        else None
    )
    return SeedArticle(
        name=path.name,
        title=title,
        text=text,
        published_at=published_at,
        language="it",
        content_hash=content_hash(title, text),
    )


SEEDS_LOCK = "coalition-watch:seeds"


@dataclass
class SeedIngestResult:
    added: int = 0
    unchanged: int = 0
    updated: int = 0
    failed: int = 0


def seed_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"seed folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SEED_SUFFIXES)


def ingest_seeds(session: Session, folder: Path, now: datetime) -> SeedIngestResult:
    """Store every seed file of ``folder`` not stored yet; a changed file updates its article.

    Identity is the file name, so ingesting twice stores each article once. A bad file is
    logged with its path and skipped; the others still go in.
    """
    result = SeedIngestResult()
    # Replicas on PostgreSQL scan the same folder at the same moment: one at a time, so a file
    # is inserted once (the others then see it stored) instead of failing on the unique uid.
    serialize(session, SEEDS_LOCK)
    existing = {
        a.uid: a for a in session.exec(select(Article).where(Article.source == "seed")).all()
    }
    for path in seed_files(folder):
        try:
            seed = parse_seed(path)
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            log.error("seed file rejected: %s", exc, extra={"seed_file": str(path)})
            result.failed += 1
            continue
        article = existing.get(seed.uid)
        if article is None:
            session.add(
                Article(
                    uid=seed.uid,
                    source="seed",
                    guid=seed.name,
                    url=None,
                    outlet="seed",
                    title=seed.title,
                    text=seed.text,
                    language=seed.language,
                    published_at=seed.published_at,
                    published_source="text" if seed.published_at else None,
                    fetched_at=now,
                    content_hash=seed.content_hash,
                )
            )
            result.added += 1
        elif article.content_hash != seed.content_hash:
            article.title = seed.title
            article.text = seed.text
            article.published_at = seed.published_at
            article.content_hash = seed.content_hash
            article.updated_at = now
            article.status = "new"
            session.add(article)
            result.updated += 1
        else:
            result.unchanged += 1
    session.flush()
    return result
