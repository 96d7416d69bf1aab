"""A real HTTP server on 127.0.0.1 (random port, in a thread) for the collector tests.

It serves the real-feed corpus in place with realistic headers (Content-Type, ETag,
Last-Modified, Cache-Control; 304 on a matching conditional request) and scripted endpoints
that a test installs with :meth:`FeedServer.route`. Every request is recorded with its
headers, and the server counts how many requests it was answering at once.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STREAM_LIMIT_SECONDS = 20.0  # an endless body stops by itself after this


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    host: str


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Callable[[], Iterator[bytes]] | None = None  # no Content-Length, until it ends
    delay: float = 0.0  # seconds before the status line


Handler = Callable[[Request], Reply]


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha1(body).hexdigest()[:16] + '"'


def conditional(
    body: bytes,
    content_type: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    extra: dict[str, str] | None = None,
) -> Handler:
    """A document with validators that answers 304 to a matching conditional request."""
    tag = etag or etag_of(body)
    stamp = last_modified or formatdate(1_700_000_000, usegmt=True)

    def handle(request: Request) -> Reply:
        headers = {"ETag": tag, "Last-Modified": stamp, **(extra or {})}
        if request.headers.get("if-none-match") == tag or (
            "if-none-match" not in request.headers
            and request.headers.get("if-modified-since") == stamp
        ):
            return Reply(304, headers)
        return Reply(200, {"Content-Type": content_type, **headers}, body)

    return handle


def content_type_for(path: Path, body: bytes) -> str:
    """What a typical web server sends for a feed file."""
    head = body[:512].lower()
    if body[:2] == b"\x1f\x8b":
        return "application/rss+xml"  # gzip bytes, and no Content-Encoding: the point
    if b"<html" in head or b"<head" in head:
        return "text/html"
    return {
        ".atom": "application/atom+xml; charset=utf-8",
        ".rss": "application/rss+xml",
    }.get(path.suffix, "text/xml")


class FeedServer:
    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> FeedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def route(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def document(self, path: str, body: bytes, content_type: str = "application/rss+xml") -> str:
        return self.route(path, conditional(body, content_type))

    def serve_corpus(self, folder: Path) -> None:
        """Every file of ``folder`` under ``/corpus/<name>``, read from disk at each request."""
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix != ".md":
                self.route(f"/corpus/{file.name}", _corpus_handler(file))

    def hits(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def reset_counters(self) -> None:
        with self.lock:
            self.max_active = 0


def _corpus_handler(file: Path) -> Handler:
    def handle(request: Request) -> Reply:
        body = file.read_bytes()  # in place, never copied
        stamp = formatdate(file.stat().st_mtime, usegmt=True)
        inner = conditional(
            body,
            content_type_for(file, body),
            last_modified=stamp,
            extra={"Cache-Control": "public, max-age=300"},
        )
        return inner(request)

    return handle


def _make_handler(server: FeedServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # no 40 ms stall between headers and body

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            request = Request(
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                host=self.headers.get("host", ""),
            )
            with server.lock:
                server.requests.append(request)
                server.active += 1
                server.max_active = max(server.max_active, server.active)
            try:
                handler = server.routes.get(self.path) or server.routes.get(path)
                reply = handler(request) if handler else Reply(404, {}, b"no such path")
                if reply.delay:
                    time.sleep(reply.delay)
                self._send(reply)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                with server.lock:
                    server.active -= 1

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.stream is not None:
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                deadline = time.monotonic() + STREAM_LIMIT_SECONDS
                for chunk in reply.stream():
                    self.wfile.write(chunk)
                    if time.monotonic() > deadline:
                        break
                return
            if reply.status != 304 and not re.match(r"1\d\d", str(reply.status)):
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if reply.status != 304 and reply.body:
                self.wfile.write(reply.body)

    return _Handler
