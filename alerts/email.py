"""Email targets: a multipart text + HTML message over SMTP (STARTTLS, implicit TLS or plain).

Every value inserted into the HTML part is escaped. The ``Message-ID`` is derived from the
delivery's idempotency key, so a retried message has the same id and mail clients thread or
drop repeats. With ``digest`` set, the alerts due for the target within one window are sent as
one message. SMTP 4xx replies, timeouts and connection errors are retried; 5xx replies and
authentication failures are permanent.
"""

from __future__ import annotations

import asyncio
import html
import smtplib
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator

from alerts.notification import ArticleView, Notification
from alerts.notifiers import DeliveryError, Notifier, Outgoing, TargetOptions
from alerts.rules import Duration

MAX_ARTICLES_SHOWN = 25
_TOPIC_NAMES = {
    "reassurance_force": "reassurance force",
    "security_guarantees": "security guarantees",
    "ceasefire_negotiations": "ceasefire negotiations",
    "us_involvement": "US involvement",
    "military_aid": "military aid",
    "russia_position": "Russia's position",
    "coalition_diplomacy": "coalition diplomacy",
    "sanctions": "sanctions",
    "off_topic": "off topic",
}


def _address(value: str) -> str:
    _name, addr = parseaddr(value)
    if "@" not in addr or addr.startswith("@") or addr.endswith("@"):
        raise ValueError(f"{value!r} is not an email address")
    return value


class EmailOptions(TargetOptions):
    kind: Literal["email"] = "email"
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    timeout: Duration = timedelta(seconds=30)
    ca_file: Path | None = None  # a private CA to trust; default: the system's
    digest: Duration | None = None
    subject_prefix: str = "[coalition-watch]"

    _password: str | None = PrivateAttr(default=None)

    @field_validator("from_")
    @classmethod
    def _from(cls, value: str) -> str:
        return _address(value)

    @field_validator("to")
    @classmethod
    def _to(cls, value: list[str]) -> list[str]:
        return [_address(v) for v in value]

    @model_validator(mode="after")
    def _load_password(self) -> EmailOptions:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        password: str | None = None
        if self.password_file is not None:
            try:
                password = self.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"cannot read password_file {str(self.password_file)!r}: {exc}"
                ) from exc
        elif self.password is not None:
            password = self.password.get_secret_value()
        if password is not None and not self.username:
            raise ValueError("a password needs a username")
        if self.username and password is None:
            raise ValueError(f"username {self.username!r} needs a password or password_file")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {str(self.ca_file)!r} is not a readable file")
        if self.digest is not None and self.digest.total_seconds() < 60:
            raise ValueError("digest windows are at least 1m")
        self._password = password
        return self

    def digest_window_seconds(self) -> float | None:
        return self.digest.total_seconds() if self.digest is not None else None

    @property
    def login_password(self) -> str | None:
        return self._password

    @property
    def message_id_domain(self) -> str:
        domain = parseaddr(self.from_)[1].rpartition("@")[2].strip()
        return domain or "coalition-watch.invalid"


# --- rendering ------------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _pct(value: float | None) -> str:
    return f"{value * 100:.0f}%" if value is not None else "—"


def _topics(a: ArticleView) -> str:
    return ", ".join(f"{_TOPIC_NAMES.get(t.name, t.name)} ({_pct(t.confidence)})" for t in a.topics)


def _safe_href(url: str | None) -> str | None:
    if url and url.lower().startswith(("http://", "https://")):
        return url
    return None


def subject(options: EmailOptions, message: Outgoing) -> str:
    ns = message.notifications
    if message.digest_window is not None:
        rules = sorted({n.rule for n in ns})
        start, end = message.digest_window
        count = sum(len(n.articles) for n in ns)
        return (
            f"{options.subject_prefix} digest {start:%Y-%m-%d %H:%M}–{end:%H:%M} UTC: "
            f"{len(ns)} alert{'s' if len(ns) != 1 else ''}, {count} articles ({', '.join(rules)})"
        )
    n = ns[0]
    outlets = len(n.outlets)
    count = len(n.articles)
    tag = "TEST " if n.type == "alert.test" else ""
    sev = n.severity.upper()
    detail = f"{count} article{'s' if count != 1 else ''}"
    if outlets:
        detail += f", {outlets} outlet{'s' if outlets != 1 else ''}"
    text = f"{options.subject_prefix} {tag}[{sev}] {n.rule}: {n.headline} ({detail})"
    return " ".join(text.split())[:250]


def _text_notification(n: Notification) -> str:
    lines = [f"Rule: {n.rule} ({n.severity})"]
    if n.rule_description:
        lines.append(n.rule_description)
    if n.story is not None:
        s = n.story
        lines.append(
            f"Story #{s.id}: {s.title} — {s.article_count} articles from {s.source_count} outlets"
        )
    lines.append(f"First match: {_when(n.fired_at)} · notified: {_when(n.notified_at)}")
    lines.append("")
    for i, a in enumerate(n.articles[:MAX_ARTICLES_SHOWN], 1):
        lines.append(f"{i}. {a.title}")
        lines.append(
            f"   {a.outlet or 'unknown outlet'} · {_when(a.published_at or a.fetched_at)}"
            f" · {a.language or '?'}"
        )
        if a.url:
            lines.append(f"   {a.url}")
        lines.append(f"   Topics: {_topics(a) or '—'}")
        lines.append(
            f"   Stance: {a.stance or '—'} ({_pct(a.stance_confidence)})"
            f" · relevance {_pct(a.relevance_confidence)}"
        )
        if a.evidence:
            lines.append(f"   Evidence: “{a.evidence}”")
        lines.append("")
    hidden = len(n.articles) - MAX_ARTICLES_SHOWN
    if hidden > 0:
        lines.append(f"… and {hidden} more articles.")
    return "\n".join(lines)


def _html_article(a: ArticleView) -> str:
    e = html.escape
    href = _safe_href(a.url)
    title = f'<a href="{e(href, quote=True)}">{e(a.title)}</a>' if href else e(a.title)
    meta = " · ".join(
        e(x) for x in (a.outlet or "unknown outlet", _when(a.published_at or a.fetched_at),
                       a.language or "?")
    )  # fmt: skip
    parts = [
        f'<li style="margin-bottom:14px"><div style="font-weight:bold">{title}</div>',
        f'<div style="color:#555">{meta}</div>',
        f"<div>Topics: {e(_topics(a) or '—')}</div>",
        f"<div>Stance: {e(a.stance or '—')} ({e(_pct(a.stance_confidence))})"
        f" · relevance {e(_pct(a.relevance_confidence))}</div>",
    ]
    if a.evidence:
        parts.append(
            '<blockquote style="margin:6px 0 0 0;padding-left:10px;border-left:3px solid #ccc">'
            f"{e(a.evidence)}</blockquote>"
        )
    parts.append("</li>")
    return "".join(parts)


def _html_notification(n: Notification) -> str:
    e = html.escape
    out = [f'<h2 style="margin-bottom:4px">{e(n.rule)} <small>({e(n.severity)})</small></h2>']
    if n.rule_description:
        out.append(f'<p style="margin-top:0">{e(n.rule_description)}</p>')
    if n.story is not None:
        s = n.story
        out.append(
            f"<p><b>Story #{s.id}:</b> {e(s.title)} — {s.article_count} articles from "
            f"{s.source_count} outlets</p>"
        )
    out.append(
        f'<p style="color:#555">First match: {e(_when(n.fired_at))} · notified: '
        f"{e(_when(n.notified_at))}</p>"
    )
    out.append("<ol>" + "".join(_html_article(a) for a in n.articles[:MAX_ARTICLES_SHOWN]))
    out.append("</ol>")
    hidden = len(n.articles) - MAX_ARTICLES_SHOWN
    if hidden > 0:
        out.append(f"<p>… and {hidden} more articles.</p>")
    return "".join(out)


def render(options: EmailOptions, message: Outgoing, now: datetime) -> EmailMessage:
    """The complete message: headers, a text part and an HTML part."""
    ns: Sequence[Notification] = message.notifications
    msg = EmailMessage()
    msg["Subject"] = subject(options, message)
    msg["From"] = options.from_
    msg["To"] = ", ".join(options.to)
    msg["Date"] = format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = f"<{message.key}@{options.message_id_domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Coalition-Watch-Rule"] = ", ".join(sorted({n.rule for n in ns}))
    alert_ids = [str(n.alert_id) for n in ns if n.alert_id is not None]
    if alert_ids:
        msg["X-Coalition-Watch-Alert"] = ", ".join(alert_ids)
    text = "\n\n----\n\n".join(_text_notification(n) for n in ns)
    msg.set_content(text + "\n\n-- \ncoalition-watch\n")
    body = "<hr>".join(_html_notification(n) for n in ns)
    msg.add_alternative(
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(msg['Subject'])}</title></head>"
        f'<body style="font-family:sans-serif;max-width:760px">{body}'
        '<p style="color:#888">— coalition-watch</p></body></html>',
        subtype="html",
    )
    return msg


# --- sending --------------------------------------------------------------------------------


class EmailNotifier(Notifier, kind="email"):
    Options = EmailOptions
    options: EmailOptions

    async def send(self, message: Outgoing) -> str:
        msg = render(self.options, message, self.deps.clock())
        return await asyncio.to_thread(self._send_sync, msg)

    def _send_sync(self, msg: EmailMessage) -> str:
        o = self.options
        timeout = o.timeout.total_seconds()
        try:
            smtp: smtplib.SMTP
            if o.security == "tls":
                smtp = smtplib.SMTP_SSL(o.host, o.port, timeout=timeout, context=self._tls())
            else:
                smtp = smtplib.SMTP(o.host, o.port, timeout=timeout)
            with smtp:
                smtp.ehlo()
                if o.security == "starttls":
                    smtp.starttls(context=self._tls())
                    smtp.ehlo()
                if o.username:
                    smtp.login(o.username, o.login_password or "")
                refused = smtp.send_message(msg)
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"SMTP authentication failed: {_reply(exc)}", permanent=True
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            detail = "; ".join(f"{r}: {c} {_text(m)}" for r, (c, m) in exc.recipients.items())
            raise DeliveryError(
                f"all recipients refused: {detail}", permanent=all(c >= 500 for c in codes)
            ) from exc
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(f"SMTP {_reply(exc)}", permanent=exc.smtp_code >= 500) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"SMTP server: {exc}", permanent=True) from exc
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(f"TLS certificate rejected: {exc}", permanent=True) from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(
                f"cannot reach SMTP server {o.host}:{o.port}: {type(exc).__name__}: {exc}"
            ) from exc
        if refused:
            # Accepted for some recipients: resending would duplicate theirs, so this counts as
            # sent; the refused ones are named in the receipt and the log.
            return f"sent; refused for {', '.join(sorted(refused))}"
        return f"sent to {len(o.to)} recipient(s)"

    def _tls(self) -> ssl.SSLContext:
        ca = self.options.ca_file
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return f"{exc.smtp_code} {_text(exc.smtp_error)}"
