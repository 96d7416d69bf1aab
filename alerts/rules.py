"""Alert rules: a YAML file, validated with pydantic; every error names the rule and the field.

```yaml
rules:
  - name: new-coalition-development
    description: A new story about the reassurance force or security guarantees.
    match:
      relevant: true
      topics_any: [reassurance_force, security_guarantees]
      new_story: true
    targets: [newsroom-mail]      # omitted: every configured target
    group_by: [story]
    group_wait: 2m
    repeat_interval: 6h
    severity: warning
```

:func:`load_rules` returns a :class:`RuleSet` or raises :class:`RulesError` with one line per
problem. :class:`RulesWatcher` reloads the file when it changes and keeps the previous rules
when the new file is invalid.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from alerts.text import KeywordSet, compile_keyword

log = logging.getLogger(__name__)

# The label vocabulary (DESIGN.md, "The classifier"); a misspelled topic is a load error.
TOPICS = (
    "reassurance_force", "security_guarantees", "ceasefire_negotiations", "us_involvement",
    "military_aid", "russia_position", "coalition_diplomacy", "sanctions", "off_topic",
)  # fmt: skip
STANCES = ("supportive", "critical", "neutral")
SEVERITIES = ("info", "warning", "critical")

Topic = Literal[
    "reassurance_force", "security_guarantees", "ceasefire_negotiations", "us_involvement",
    "military_aid", "russia_position", "coalition_diplomacy", "sanctions", "off_topic",
]  # fmt: skip
Stance = Literal["supportive", "critical", "neutral"]
Severity = Literal["info", "warning", "critical"]
GroupKey = Literal["story", "rule"]

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: object) -> timedelta:
    """``"30s"``, ``"5m"``, ``"6h"``, ``"1d"``, ``"1h30m"``, or a number of seconds."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if not text or pos != len(text):
            raise ValueError(
                f"invalid duration {value!r}: write a number and a unit (ms, s, m, h, d, w), "
                "like 30s, 5m, 6h or 1h30m"
            )
    else:
        raise ValueError(f"invalid duration {value!r}")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out


def _check_keyword(value: str) -> str:
    compile_keyword(value)  # raises ValueError with the reason
    return value


def _check_target(value: str, info: ValidationInfo) -> str:
    known = (info.context or {}).get("targets")
    if known is None or value in known:
        return value
    if not known:
        raise ValueError(f"unknown target {value!r}: no targets are configured (alerts.targets)")
    hint = difflib.get_close_matches(value, list(known), n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ValueError(
        f"unknown target {value!r}{did_you_mean}; configured: {', '.join(sorted(known))}"
    )


def _default_group_by() -> list[GroupKey]:
    return ["rule", "story"]


class Match(BaseModel):
    """What an article must be for the rule to fire. Every condition given must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relevant: bool | None = None
    topics_any: list[Topic] = Field(default_factory=list)
    topics_all: list[Topic] = Field(default_factory=list)
    stance_in: list[Stance] = Field(default_factory=list)
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    keywords_any: list[Annotated[str, AfterValidator(_check_keyword)]] = Field(default_factory=list)
    languages: list[str] = Field(default_factory=list)
    feeds: list[str] = Field(default_factory=list)
    new_story: bool | None = None
    min_story_sources: int | None = Field(default=None, ge=1)

    _keywords: KeywordSet = PrivateAttr(default_factory=lambda: KeywordSet(()))

    def model_post_init(self, _context: Any) -> None:
        self._keywords = KeywordSet.of(self.keywords_any)

    @property
    def keywords(self) -> KeywordSet:
        return self._keywords

    @field_validator("languages")
    @classmethod
    def _lower_languages(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    description: str = ""
    match: Match
    # None: every configured target.
    targets: list[Annotated[str, AfterValidator(_check_target)]] | None = None
    group_by: list[GroupKey] = Field(default_factory=lambda: _default_group_by())
    group_wait: Duration = timedelta(seconds=30)
    repeat_interval: Duration = timedelta(hours=4)
    severity: Severity = "info"

    @field_validator("group_by")
    @classmethod
    def _group_by(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("group_by needs 'story', 'rule' or both")
        if len(set(value)) != len(value):
            raise ValueError("group_by lists a key twice")
        return value

    def target_names(self, configured: Collection[str]) -> list[str]:
        return list(configured) if self.targets is None else list(self.targets)


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule]


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str = "<memory>"
    digest: str = ""
    by_name: Mapping[str, Rule] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, name: str) -> Rule | None:
        return self.by_name.get(name)

    @classmethod
    def of(cls, rules: list[Rule], source: str = "<memory>", digest: str = "") -> RuleSet:
        return cls(tuple(rules), source, digest, {r.name: r for r in rules})


class RulesError(Exception):
    """The rules file is invalid; ``errors`` holds one message per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s):\n" + "\n".join(errors))


def default_rules_path() -> Path:
    """The rules shipped with the package (``alerts/default_rules.yaml``)."""
    return Path(str(resources.files("alerts").joinpath("default_rules.yaml")))


def load_rules(path: Path, targets: Collection[str] | None = None) -> RuleSet:
    """Read and validate ``path``; ``targets`` are the configured target names (None: no check)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RulesError(str(path), [f"cannot read the rules file: {exc}"]) from exc
    return parse_rules(raw.decode("utf-8", errors="replace"), str(path), targets)


def parse_rules(text: str, source: str, targets: Collection[str] | None = None) -> RuleSet:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesError(source, [f"{where}not valid YAML: {problem}"]) from exc
    if not isinstance(data, dict):
        raise RulesError(source, ["expected a mapping with a `rules:` list at the top"])
    context = {"targets": set(targets)} if targets is not None else None
    errors: list[str] = []
    try:
        parsed = RulesFile.model_validate(data, context=context)
    except ValidationError as exc:
        errors = [_describe(err, data) for err in exc.errors()]
        raise RulesError(source, errors) from exc
    seen: dict[str, int] = {}
    for i, rule in enumerate(parsed.rules):
        if rule.name in seen:
            errors.append(
                f"rule {rule.name!r} (rules[{i}]): name: duplicate of rules[{seen[rule.name]}]"
            )
        seen.setdefault(rule.name, i)
    if errors:
        raise RulesError(source, errors)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return RuleSet.of(parsed.rules, source, digest)


_FIELDS: dict[str, type[BaseModel]] = {"": RulesFile, "rule": Rule, "match": Match}


def _describe(err: Any, data: dict[str, Any]) -> str:
    loc: tuple[Any, ...] = tuple(err["loc"])
    who = ""
    rest = loc
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        index = loc[1]
        rules = data.get("rules")
        name = None
        if isinstance(rules, list) and index < len(rules) and isinstance(rules[index], dict):
            name = rules[index].get("name")
        who = f"rule {name!r} (rules[{index}])" if isinstance(name, str) else f"rules[{index}]"
        rest = loc[2:]
    path = ""
    for part in rest:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = _unknown_field(loc)
    elif err["type"] == "missing":
        message = "required field is missing"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    head = ": ".join(p for p in (who, path) if p)
    return f"{head}: {message}" if head else message


def _unknown_field(loc: tuple[Any, ...]) -> str:
    name = str(loc[-1])
    parent = [p for p in loc[:-1] if not isinstance(p, int)]
    model = _FIELDS["match" if parent[-1:] == ["match"] else ("rule" if parent else "")]
    choices = list(model.model_fields)
    hint = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if hint:
        return f"unknown field {name!r} (did you mean {hint[0]!r}?)"
    return f"unknown field {name!r}; known fields: {', '.join(choices)}"


class RulesWatcher:
    """The current rules, reloaded when the file changes.

    A reload with errors logs every error and keeps the rules already loaded; the alert state
    lives in the database, so nothing else is lost on reload.
    """

    def __init__(self, path: Path, targets: Collection[str] | None = None) -> None:
        self.path = path
        self.targets = set(targets) if targets is not None else None
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._rules = load_rules(path, self.targets)  # the first load must succeed
        self.last_error: RulesError | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> RuleSet:
        """The rules, after reloading them when the file's size or mtime changed."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return self._rules
            self._stamp = stamp
            try:
                rules = load_rules(self.path, self.targets)
            except RulesError as exc:
                self.last_error = exc
                self.reloads_failed += 1
                log.error(
                    "alert rules reload failed, keeping the %d rules loaded before: %s",
                    len(self._rules), exc,
                )  # fmt: skip
                return self._rules
            if rules.digest != self._rules.digest:
                log.info(
                    "alert rules reloaded from %s: %d rules (%s)",
                    self.path, len(rules), ", ".join(r.name for r in rules),
                )  # fmt: skip
            self._rules = rules
            self.last_error = None
            self.reloads_ok += 1
            return rules
