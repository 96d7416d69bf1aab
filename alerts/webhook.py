"""Webhook targets: a JSON POST signed per the Standard Webhooks scheme.

Headers: ``webhook-id`` (the delivery's idempotency key, the same on every retry),
``webhook-timestamp`` (Unix seconds of this attempt) and ``webhook-signature``:
``v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``. A secret written
``whsec_<base64>`` uses the decoded bytes as the key; any other secret its UTF-8 bytes.

2xx is success; 408, 429, 5xx, timeouts and connection errors are retried (``Retry-After``
honoured); redirects and other 4xx are permanent. The body's schema is in the README.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator

from alerts.notification import ArticleView, Notification
from alerts.notifiers import DeliveryError, Notifier, Outgoing, TargetOptions
from alerts.rules import Duration

SCHEMA_VERSION = 1
USER_AGENT = "coalition-watch-webhook/1"
_RESERVED_HEADERS = {
    "webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "content-length",
    "host",
}  # fmt: skip
_RETRY_STATUSES = {408, 429}


class WebhookVerificationError(Exception):
    """A webhook's signature or timestamp does not check out."""


def signing_key(secret: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` decoded, any other secret as UTF-8 bytes."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_") :], validate=True)
        except binascii.Error as exc:
            raise ValueError("a 'whsec_' secret must be followed by base64") from exc
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one message."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: datetime | None = None,
    tolerance: timedelta = timedelta(minutes=5),
) -> None:
    """Check a received webhook as a receiver would; raises :class:`WebhookVerificationError`."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lower["webhook-id"]
        timestamp = int(lower["webhook-timestamp"])
        signatures = lower["webhook-signature"].split()
    except (KeyError, ValueError) as exc:
        raise WebhookVerificationError(f"missing or malformed webhook header: {exc}") from exc
    current = (now or datetime.now(UTC)).timestamp()
    if abs(current - timestamp) > tolerance.total_seconds():
        raise WebhookVerificationError("timestamp outside the tolerance window")
    expected = sign(secret, msg_id, timestamp, body)
    if not any(hmac.compare_digest(expected, s) for s in signatures if s.startswith("v1,")):
        raise WebhookVerificationError("no matching v1 signature")


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _article(a: ArticleView) -> dict[str, Any]:
    return {
        "id": a.id,
        "title": a.title,
        "url": a.url,
        "outlet": a.outlet,
        "published_at": _iso(a.published_at),
        "language": a.language,
        "story_id": a.story_id,
        "relevant": a.relevant,
        "relevance_confidence": a.relevance_confidence,
        "topics": [{"name": t.name, "confidence": t.confidence} for t in a.topics],
        "stance": a.stance,
        "stance_confidence": a.stance_confidence,
        "evidence": a.evidence,
    }


def payload(n: Notification) -> dict[str, Any]:
    """The JSON body (documented in the README, "Webhook body")."""
    story = n.story
    return {
        "id": n.id,
        "type": n.type,
        "version": SCHEMA_VERSION,
        "alert_id": n.alert_id,
        "rule": n.rule,
        "rule_description": n.rule_description,
        "severity": n.severity,
        "group_key": n.group_key,
        "fired_at": _iso(n.fired_at),
        "notified_at": _iso(n.notified_at),
        "story": (
            {
                "id": story.id,
                "title": story.title,
                "article_count": story.article_count,
                "source_count": story.source_count,
            }
            if story is not None
            else None
        ),
        "articles": [_article(a) for a in n.articles],
    }


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class WebhookOptions(TargetOptions):
    kind: Literal["webhook"] = "webhook"
    url: str
    secret: SecretStr | None = None
    secret_file: Path | None = None
    timeout: Duration = timedelta(seconds=10)
    headers: dict[str, str] = Field(default_factory=dict)

    _secret: str = PrivateAttr(default="")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = httpx.URL(value)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"url {value!r} must be an http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        clash = sorted(k for k in value if k.lower() in _RESERVED_HEADERS)
        if clash:
            raise ValueError(f"headers set by the signer cannot be overridden: {', '.join(clash)}")
        return value

    @model_validator(mode="after")
    def _load_secret(self) -> WebhookOptions:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret or secret_file (webhooks are signed)")
        if self.secret_file is not None:
            try:
                secret = self.secret_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(
                    f"cannot read secret_file {str(self.secret_file)!r}: {exc}"
                ) from exc
        else:
            assert self.secret is not None
            secret = self.secret.get_secret_value()
        if not secret:
            raise ValueError("the secret is empty")
        signing_key(secret)  # a malformed whsec_ secret fails here, with the target's name
        self._secret = secret
        return self

    @property
    def signing_secret(self) -> str:
        return self._secret


class WebhookNotifier(Notifier, kind="webhook"):
    Options = WebhookOptions
    options: WebhookOptions

    async def send(self, message: Outgoing) -> str:
        opts = self.options
        if len(message.notifications) != 1:
            raise DeliveryError("a webhook carries exactly one notification", permanent=True)
        body = encode(payload(message.notifications[0]))
        now = self.deps.clock()
        timestamp = int(now.timestamp())
        headers = {
            **opts.headers,
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": message.key,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(opts.signing_secret, message.key, timestamp, body),
        }
        timeout = opts.timeout.total_seconds()
        client = self.deps.http
        try:
            if client is None:
                async with httpx.AsyncClient() as own:
                    response = await self._post(own, body, headers, timeout)
            else:
                response = await self._post(client, body, headers, timeout)
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timed out after {timeout:g}s ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise DeliveryError(f"connection error: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if 200 <= status < 300:
            return f"HTTP {status}"
        snippet = response.text[:200].strip()
        reason = f"HTTP {status}" + (f": {snippet}" if snippet else "")
        if status in _RETRY_STATUSES or status >= 500:
            retry_after = parse_retry_after(response.headers.get("retry-after"), now)
            raise DeliveryError(reason, retry_after=retry_after)
        if 300 <= status < 400:
            where = response.headers.get("location", "?")
            raise DeliveryError(f"{reason} (redirect to {where} not followed)", permanent=True)
        raise DeliveryError(reason, permanent=True)

    async def _post(
        self, client: httpx.AsyncClient, body: bytes, headers: dict[str, str], timeout: float
    ) -> httpx.Response:
        return await client.post(
            self.options.url, content=body, headers=headers, timeout=timeout,
            follow_redirects=False,
        )  # fmt: skip
