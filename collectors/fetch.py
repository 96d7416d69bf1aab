"""HTTP fetching of feeds: one injected ``httpx.AsyncClient``, polite and bounded.

What a fetch guarantees, whatever the server does:

- a global limit and a per-host limit on requests in flight (waiting for a slot does not
  count against the timeout);
- a connect timeout and a total timeout for the whole fetch, redirects included;
- at most ``max_redirects`` redirects, followed here (the client must not follow them) so a
  chain that starts with permanent redirects (301/308) reports the feed's new address;
- a body cap, enforced while streaming on the decoded bytes (so a gzip bomb stops too);
- gzip/deflate decoding, including a gzip or zlib body served without ``Content-Encoding``,
  recognised by its magic bytes;
- conditional requests (``If-None-Match``/``If-Modified-Since``) when validators are given.

A failure never raises: it comes back as a :class:`FetchResult` with an error ``kind`` (a
fixed vocabulary, safe as a metric label) and a message that names the URL.
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import httpx

DEFAULT_ACCEPT = (
    "application/rss+xml, application/atom+xml, application/rdf+xml;q=0.9, "
    "application/feed+json;q=0.9, application/xml;q=0.8, text/xml;q=0.8, */*;q=0.5"
)
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
PERMANENT_REDIRECTS = frozenset({301, 308})

# Error kinds (bounded: they are metric labels). HTTP errors are "http_<status>".
DNS = "dns"
CONNECT = "connect"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
REDIRECT = "redirect"
INVALID_URL = "invalid_url"
NOT_A_FEED = "not_a_feed"
PARSE = "parse"

_DNS_HINTS = (
    "name or service not known",
    "nodename nor servname",
    "temporary failure in name resolution",
    "no address associated",
    "getaddrinfo failed",
    "name resolution",
)


class FetchLimits(Protocol):
    """The options a :class:`Fetcher` reads (``collectors.feeds.FeedOptions`` has them)."""

    connect_timeout: float
    total_timeout: float
    max_body_bytes: int
    max_redirects: int
    max_concurrency: int
    per_host_concurrency: int
    user_agent: str


@dataclass
class FetchResult:
    url: str
    final_url: str
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    # Where the feed now lives when the chain began with permanent redirects (301/308).
    permanent_url: str | None = None
    redirects: list[tuple[int, str]] = field(default_factory=list)
    error_kind: str | None = None
    error: str | None = None
    # Seconds the server asked us to wait (Retry-After on 429/503).
    retry_after: float | None = None
    elapsed: float = 0.0
    conditional: bool = False
    decompressed: str | None = None  # "gzip"/"zlib" when the body was sniffed and inflated

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.status is not None and 200 <= self.status < 300

    @property
    def not_modified(self) -> bool:
        return self.error_kind is None and self.status == 304


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def host_key(url: str) -> str:
    """The per-host limit's key: the host name (all ports of a host share its limit)."""
    parts = urlsplit(url)
    return (parts.hostname or parts.netloc or url).lower()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    reference = now or datetime.now(when.tzinfo)
    return max(0.0, (when - reference).total_seconds())


def _is_dns_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return True
        if any(hint in str(current).lower() for hint in _DNS_HINTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def describe_transport_error(exc: BaseException, url: str, limits: FetchLimits) -> tuple[str, str]:
    """The (kind, message) of a network-level failure while fetching ``url``."""
    host = urlsplit(url).hostname or url
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        return TIMEOUT, (
            f"connecting to {host} timed out after {limits.connect_timeout:g} s ({url})"
        )
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return TIMEOUT, f"{url} did not answer in full within {limits.total_timeout:g} s"
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return INVALID_URL, f"{url} is not a URL that can be fetched: {detail}"
    if isinstance(exc, httpx.DecodingError):
        return PARSE, f"the body from {url} does not decode as its Content-Encoding says: {detail}"
    if _is_dns_failure(exc):
        return DNS, f"cannot resolve host {host} ({url}): {detail}"
    if isinstance(exc, httpx.ConnectError):
        return CONNECT, f"cannot connect to {host} ({url}): {detail}"
    if isinstance(exc, (httpx.TransportError, OSError)):
        return CONNECT, f"connection to {host} failed while fetching {url}: {detail}"
    return CONNECT, f"fetching {url} failed: {type(exc).__name__}: {detail}"


def sniff_decompress(body: bytes, cap: int) -> tuple[bytes, str | None]:
    """Inflate a gzip or zlib body that came without ``Content-Encoding`` (magic bytes).

    Raises :class:`_Failure` when the inflated body passes ``cap`` or is corrupt.
    """
    if body[:2] == b"\x1f\x8b":
        kind, wbits = "gzip", 16 + zlib.MAX_WBITS
    elif len(body) > 1 and body[0] == 0x78 and (body[0] << 8 | body[1]) % 31 == 0:
        kind, wbits = "zlib", zlib.MAX_WBITS
    else:
        return body, None
    out: list[bytes] = []
    size = 0
    data = body
    try:
        while data:
            inflater = zlib.decompressobj(wbits)
            chunk = inflater.decompress(data, cap + 1 - size)
            size += len(chunk)
            out.append(chunk)
            if size > cap:
                raise _Failure(TOO_LARGE, "")
            if not inflater.eof:
                if inflater.unconsumed_tail:
                    raise _Failure(TOO_LARGE, "")
                break  # truncated stream: keep what inflated
            data = inflater.unused_data
            if kind != "gzip" or data[:2] != b"\x1f\x8b":
                break  # only gzip has further members
    except zlib.error as exc:
        message = f"the body looks {kind}-compressed but cannot be inflated: {exc}"
        raise _Failure(PARSE, message) from exc
    return b"".join(out), kind


class _CappedInflater:
    """Decodes a ``Content-Encoding: gzip``/``deflate`` body chunk by chunk, never producing
    more than ``cap`` + 1 bytes in all. (httpx inflates each network chunk in full: 64 KB of
    a gzip bomb become 64 MB before any cap can look at them.)"""

    def __init__(self, encoding: str, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.raw_fallback = encoding == "deflate"  # "deflate" is zlib-wrapped, or raw at times
        # gzip: 16 + MAX_WBITS; deflate: 32 + MAX_WBITS accepts a zlib (or gzip) header.
        self._obj = zlib.decompressobj((16 if encoding in ("gzip", "x-gzip") else 32) + 15)

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data and not self._obj.eof:
            try:
                chunk = self._obj.decompress(data, self.cap + 1 - self.size)
            except zlib.error:
                if not (self.raw_fallback and self.size == 0):
                    raise
                self.raw_fallback = False
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self.raw_fallback = False
            self.size += len(chunk)
            out.append(chunk)
            if self.size > self.cap:
                raise _Failure(TOO_LARGE, "")
            data = self._obj.unconsumed_tail
        return b"".join(out)


class Fetcher:
    """Fetches URLs through the injected client within the limits of ``limits``."""

    def __init__(self, client: httpx.AsyncClient, limits: FetchLimits) -> None:
        self.client = client
        self.limits = limits
        self._global = asyncio.Semaphore(limits.max_concurrency)
        self._hosts: dict[str, asyncio.Semaphore] = {}

    def _host_slot(self, url: str) -> asyncio.Semaphore:
        key = host_key(url)
        slot = self._hosts.get(key)
        if slot is None:
            slot = self._hosts[key] = asyncio.Semaphore(self.limits.per_host_concurrency)
        return slot

    async def fetch(
        self,
        url: str,
        *,
        etag: str | None = None,
        last_modified: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> FetchResult:
        """GET ``url`` (conditionally when validators are given); never raises."""
        headers = {"User-Agent": self.limits.user_agent, "Accept": DEFAULT_ACCEPT}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        if extra_headers:
            headers.update(extra_headers)
        result = FetchResult(url=url, final_url=url, conditional=bool(etag or last_modified))
        async with self._global:
            started = time.monotonic()
            try:
                await self._follow(result, headers)
            except _Failure as failure:
                result.error_kind, result.error = failure.kind, failure.message
            except (httpx.HTTPError, OSError, TimeoutError) as exc:
                where = result.final_url
                result.error_kind, result.error = describe_transport_error(exc, where, self.limits)
            finally:
                result.elapsed = time.monotonic() - started
        return result

    async def _follow(self, result: FetchResult, headers: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        current = result.url
        chain_permanent = True
        visited = {current}
        for _hop in range(self.limits.max_redirects + 1):
            slot = self._host_slot(current)
            if deadline is None:
                await slot.acquire()  # queueing for a polite slot is not the server's time
                deadline = loop.time() + self.limits.total_timeout
            else:
                async with asyncio.timeout_at(deadline):
                    await slot.acquire()
            try:
                async with asyncio.timeout_at(deadline):
                    location = await self._request(result, current, headers)
            finally:
                slot.release()
            if location is None:
                return
            status = result.status or 0
            result.redirects.append((status, location))
            if chain_permanent and status in PERMANENT_REDIRECTS:
                result.permanent_url = location
            else:
                chain_permanent = False
            if location in visited:
                raise _Failure(REDIRECT, f"{result.url} redirects in a loop (back to {location})")
            visited.add(location)
            current = result.final_url = location
        raise _Failure(
            REDIRECT,
            f"{result.url} redirects more than {self.limits.max_redirects} times "
            f"(last to {current})",
        )

    async def _request(self, result: FetchResult, url: str, headers: dict[str, str]) -> str | None:
        """One hop; returns the next URL for a redirect, else fills ``result`` and None."""
        async with self.client.stream("GET", url, headers=headers) as response:
            result.status = response.status_code
            result.headers = {k.lower(): v for k, v in response.headers.items()}
            status = response.status_code
            if status in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise _Failure(
                        f"http_{status}", f"{url} answered HTTP {status} without a Location"
                    )
                target = urljoin(url, location.strip())
                if urlsplit(target).scheme not in ("http", "https"):
                    raise _Failure(REDIRECT, f"{url} redirects to an unsupported URL {target}")
                return target
            if status == 304:
                return None
            if not 200 <= status < 300:
                if status in (429, 503):
                    result.retry_after = parse_retry_after(response.headers.get("retry-after"))
                reason = response.reason_phrase or ""
                wait = (
                    f" (Retry-After: {result.retry_after:g} s)"
                    if result.retry_after is not None
                    else ""
                )
                raise _Failure(
                    f"http_{status}", f"{url} answered HTTP {status} {reason}".rstrip() + wait
                )
            result.body = await self._read_capped(response, url, result)
            return None

    async def _read_capped(self, response: httpx.Response, url: str, result: FetchResult) -> bytes:
        cap = self.limits.max_body_bytes
        too_large = f"{url} sent more than {cap:,} bytes (the body cap): stopped reading"
        declared = response.headers.get("content-length")
        if (
            declared
            and declared.isdigit()
            and int(declared) > cap
            and not response.headers.get("content-encoding")
        ):
            raise _Failure(TOO_LARGE, f"{url} declares {int(declared):,} bytes, over the cap")
        chunks: list[bytes] = []
        size = 0
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            inflater = _CappedInflater(encoding, cap)
            try:
                async for raw in response.aiter_raw():
                    chunks.append(inflater.feed(raw))
            except _Failure:
                raise _Failure(TOO_LARGE, too_large) from None
            except zlib.error as exc:
                raise httpx.DecodingError(str(exc)) from exc
        else:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > cap:
                    raise _Failure(TOO_LARGE, too_large)
                chunks.append(chunk)
        body = b"".join(chunks)
        try:
            body, sniffed = sniff_decompress(body, cap)
        except _Failure as failure:
            raise _Failure(failure.kind, failure.message or too_large) from None
        result.decompressed = sniffed
        return body


def make_http_client(limits: FetchLimits) -> httpx.AsyncClient:
    """The client a :class:`Fetcher` expects: no automatic redirects, our timeouts and
    User-Agent, and a connection pool as large as the global concurrency limit."""
    return httpx.AsyncClient(
        follow_redirects=False,
        timeout=httpx.Timeout(limits.total_timeout, connect=limits.connect_timeout),
        headers={"User-Agent": limits.user_agent},
        limits=httpx.Limits(
            max_connections=limits.max_concurrency,
            max_keepalive_connections=limits.max_concurrency,
        ),
    )
