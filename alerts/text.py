"""Text helpers for rules and notifications: accent-folding, keyword matching, evidence.

Keywords are matched on *folded* text: Unicode-decomposed, accents dropped, case-folded, so
``Cremlino``, ``CREMLINO`` and ``Crèmlino`` are one word. A keyword is either a word or phrase
(matched on word boundaries; whitespace inside a phrase matches any run of whitespace) or a
regular expression written between slashes (``/russ(ia|o)/``), applied to the folded text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

EVIDENCE_MAX_CHARS = 600
_MIN_PARAGRAPH_CHARS = 40

# A few words per topic, Italian and English, to find the paragraph that carries the topic.
# Folded (no accents, lower case); a trailing ``*`` makes a prefix. They only rank paragraphs;
# they never decide a match.
TOPIC_TERMS: dict[str, tuple[str, ...]] = {
    "reassurance_force": (
        "reassurance force", "forza di rassicurazione", "multinational force",
        "forza multinazionale", "troops", "truppe", "soldati", "deploy", "dispiegamento",
        "contingente", "peacekeep*", "boots on the ground", "scarponi sul terreno",
    ),
    "security_guarantees": (
        "security guarantee*", "garanzie di sicurezza", "garanzia di sicurezza", "article 5",
        "articolo 5", "backstop", "guarantee", "garanzi*",
    ),
    "ceasefire_negotiations": (
        "ceasefire", "cessate il fuoco", "tregua", "truce", "armistice", "armistizio",
        "peace talks", "negoziat*", "negotiat*", "colloqui", "peace plan", "piano di pace",
    ),
    "us_involvement": (
        "united states", "stati uniti", "washington", "white house", "casa bianca", "trump",
        "american*", "usa", "witkoff", "rubio", "pentagon",
    ),
    "military_aid": (
        "military aid", "aiuti militari", "weapons", "armi", "missil*", "air defen*",
        "difesa aerea", "ammunition", "munizioni", "patriot", "drones", "droni", "tranche",
    ),
    "russia_position": (
        "kremlin", "cremlino", "moscow", "mosca", "putin", "peskov", "lavrov", "zakharova",
        "medvedev", "russ*",
    ),
    "coalition_diplomacy": (
        "coalition of the willing", "coalizione dei volenterosi", "volenterosi", "summit",
        "vertice", "leaders", "leader", "macron", "starmer", "meloni", "merz", "paris", "parigi",
        "london", "londra", "declaration", "dichiarazione",
    ),
    "sanctions": (
        "sanction*", "sanzion*", "embargo", "price cap", "frozen assets", "beni congelati",
    ),
}  # fmt: skip


def fold(text: str) -> str:
    """Lower-case ``text`` and strip its accents (``Città`` → ``citta``)."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return stripped.casefold()


def is_regex_keyword(keyword: str) -> bool:
    return len(keyword) >= 2 and keyword.startswith("/") and keyword.endswith("/")


def compile_keyword(keyword: str) -> re.Pattern[str]:
    """The pattern for one keyword; raises ``ValueError`` naming the problem."""
    if is_regex_keyword(keyword):
        body = keyword[1:-1]
        if not body:
            raise ValueError("empty regular expression")
        try:
            return re.compile(fold(body))
        except re.error as exc:
            raise ValueError(f"invalid regular expression {keyword!r}: {exc}") from exc
    words = fold(keyword).split()
    if not words:
        raise ValueError("empty keyword")
    phrase = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){phrase}(?!\w)")


@dataclass(frozen=True)
class KeywordSet:
    """Compiled keywords; ``search`` expects folded text."""

    patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, keywords: Iterable[str]) -> KeywordSet:
        return cls(tuple(compile_keyword(k) for k in keywords))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def search(self, folded: str) -> bool:
        return any(p.search(folded) for p in self.patterns)

    def count(self, folded: str) -> int:
        return sum(len(p.findall(folded)) for p in self.patterns)


def paragraphs(text: str) -> list[str]:
    """The text's paragraphs: blank-line separated, or line separated when there are none."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(parts) <= 1:
        parts = [p.strip() for p in text.splitlines() if p.strip()]
    return parts


def evidence_paragraph(
    text: str,
    *,
    keywords: KeywordSet | None = None,
    topics: Sequence[str] = (),
    max_chars: int = EVIDENCE_MAX_CHARS,
) -> str:
    """The paragraph that best shows why the article matched.

    Score: rule keyword hits count three, topic-term hits one; ties go to the earlier paragraph
    (news puts the point first). Very short paragraphs (datelines, captions) are used only when
    nothing else exists. The result is cut at a word boundary near ``max_chars``.
    """
    candidates = paragraphs(text)
    if not candidates:
        return ""
    long_enough = [p for p in candidates if len(p) >= _MIN_PARAGRAPH_CHARS] or candidates
    terms = _topic_pattern(tuple(sorted(set(topics))))

    def score(paragraph: str) -> int:
        folded = fold(paragraph)
        hits = 3 * keywords.count(folded) if keywords else 0
        return hits + (len(terms.findall(folded)) if terms is not None else 0)

    best = max(long_enough, key=score)  # max() keeps the first of equal scores
    return shorten(best, max_chars)


def _term(term: str) -> str:
    if term.endswith("*"):
        return re.escape(term[:-1])
    return rf"{re.escape(term)}(?!\w)"


@lru_cache(maxsize=256)
def _topic_pattern(topics: tuple[str, ...]) -> re.Pattern[str] | None:
    """One pattern for every term of ``topics`` (each hit counts once)."""
    terms = sorted({t for topic in topics for t in TOPIC_TERMS.get(topic, ())}, key=len)
    if not terms:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(_term(t) for t in reversed(terms)) + ")")


def shorten(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " …"
