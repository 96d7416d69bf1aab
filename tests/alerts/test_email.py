"""Email through a real SMTP server (aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from sqlmodel import col, select

from alerts.notifiers import parse_target
from storage.db import SessionFactory
from storage.models import Delivery
from tests.alerts.conftest import (
    Clock,
    MailSink,
    Pipeline,
    SmtpServer,
    add_article,
    add_story,
    email_target,
)
from tests.conftest import free_port

EVIDENCE = (
    "Il Cremlino ha respinto ogni ipotesi di una forza di rassicurazione europea: "
    "truppe della coalizione in Ucraina sarebbero un bersaglio legittimo, ha detto Peskov."
)
TEXT = (
    "Mosca, 7 gennaio.\n\n"
    "La giornata si è aperta con il maltempo sulla capitale e il traffico bloccato.\n\n"
    f"{EVIDENCE}\n\n"
    "In serata i mercati hanno chiuso in lieve rialzo."
)


def parts(msg: EmailMessage) -> tuple[str, str]:
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def rows(sessions: SessionFactory) -> list[Delivery]:
    with sessions() as s:
        return list(s.exec(select(Delivery).order_by(col(Delivery.id))).all())


async def test_the_email_arrives_with_headers_both_parts_and_escaped_html(
    sessions: SessionFactory, clock: Clock, smtp: SmtpServer
) -> None:
    pipe = Pipeline(sessions, clock, [email_target("desk", smtp.port)])
    story = add_story(sessions, "Mosca risponde alla coalizione", sources=2)
    title = 'Peskov: <script>alert("x")</script> "bersaglio legittimo" & altro'
    add_article(
        sessions, story_id=story, title=title, text=TEXT, outlet="ANSA", language="it",
        url="https://www.ansa.it/mondo/1", topics={"russia_position": 0.88},
        stance="critical", stance_score=0.91,
    )  # fmt: skip
    add_article(sessions, story_id=story, title="Second outlet", outlet="Reuters",
                topics={"reassurance_force": 0.7})  # fmt: skip
    pipe.rules_text = pipe.rules_text.replace(
        "topics_any: [reassurance_force, security_guarantees]",
        "topics_any: [reassurance_force, russia_position]\n      keywords_any: [Cremlino, Peskov]",
    )
    pipe.evaluate()
    clock.advance(minutes=2)
    pipe.flush()
    result = await pipe.deliver()
    assert result.outcomes == {("email", "sent"): 1}
    [msg] = smtp.messages
    [row] = rows(sessions)
    assert msg["Message-ID"] == f"<{row.idempotency_key}@cw.example>"
    assert msg["From"] == "Coalition Watch <alerts@cw.example>"
    assert msg["To"] == "desk@newsroom.example"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Coalition-Watch-Rule"] == "coalition"
    subject = str(msg["Subject"])
    assert subject.startswith("[coalition-watch] [WARNING] coalition: Mosca risponde alla coal")
    assert "(1 article, 1 outlet)" in subject  # only the first matched the keywords
    assert msg.get_content_type() == "multipart/alternative"
    text, html = parts(msg)
    # Text part: the values as they are.
    assert title in text
    assert "Story #" in text and "Mosca risponde alla coalizione" in text
    assert "ANSA" in text and "https://www.ansa.it/mondo/1" in text
    assert "Russia's position (88%)" in text
    assert "Stance: critical (91%)" in text and "relevance 97%" in text
    assert EVIDENCE in text  # the paragraph with the keyword and topic hits, not the first one
    assert "maltempo" not in text
    # HTML part: every inserted value escaped.
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "&amp; altro" in html
    assert '<a href="https://www.ansa.it/mondo/1">' in html
    assert "Il Cremlino ha respinto" in html


async def test_smtp_down_then_up_delivers_after_it_comes_back(
    sessions: SessionFactory, clock: Clock
) -> None:
    server = SmtpServer()  # port reserved, nothing listening yet
    pipe = Pipeline(sessions, clock, [email_target("desk", server.port)])
    add_article(sessions, story_id=add_story(sessions, "s"))
    pipe.evaluate()
    clock.advance(minutes=2)
    pipe.flush()
    for _ in range(2):
        result = await pipe.deliver()
        assert result.outcomes == {("email", "retry"): 1}
        [row] = rows(sessions)
        assert row.last_error is not None and "cannot reach SMTP server" in row.last_error
        clock.now = row.next_attempt_at
    server.start()
    try:
        result = await pipe.deliver()
        assert result.outcomes == {("email", "sent"): 1}
        [msg] = server.messages
        [row] = rows(sessions)
        assert row.status == "sent" and row.attempts == 3
        assert msg["Message-ID"] == f"<{row.idempotency_key}@cw.example>"
        clock.advance(hours=1)
        await pipe.deliver()
        assert len(server.messages) == 1
    finally:
        server.stop()


async def test_smtp_5xx_dead_letters_and_4xx_retries(
    sessions: SessionFactory, clock: Clock, smtp: SmtpServer
) -> None:
    pipe = Pipeline(sessions, clock, [email_target("desk", smtp.port)])
    add_article(sessions, story_id=add_story(sessions, "s"))
    pipe.evaluate()
    clock.advance(minutes=2)
    pipe.flush()
    smtp.sink.reject = "451 4.3.0 try again later"
    assert (await pipe.deliver()).outcomes == {("email", "retry"): 1}
    clock.advance(minutes=1)
    smtp.sink.reject = "554 5.7.1 message refused"
    assert (await pipe.deliver()).outcomes == {("email", "dead"): 1}
    [row] = rows(sessions)
    assert row.last_error == "permanent error: SMTP 554 5.7.1 message refused"


async def test_digest_mode_sends_one_message_per_window(
    sessions: SessionFactory, smtp: SmtpServer
) -> None:
    clock = Clock(datetime(2026, 1, 6, 9, 10, tzinfo=UTC))
    pipe = Pipeline(sessions, clock, [email_target("digest", smtp.port, digest="1h")])
    for i in range(3):  # three stories: three notifications in one hourly window
        add_article(sessions, story_id=add_story(sessions, f"story {i}"), title=f"Article {i}")
    pipe.evaluate()
    clock.advance(minutes=2)
    assert pipe.flush().deliveries == 3
    assert all(r.next_attempt_at == datetime(2026, 1, 6, 10, 0, tzinfo=UTC) for r in rows(sessions))
    assert (await pipe.deliver()).outcomes == {}  # the window is not over
    clock.now = datetime(2026, 1, 6, 10, 0, 5, tzinfo=UTC)
    assert (await pipe.deliver()).outcomes == {("email", "sent"): 3}
    [msg] = smtp.messages
    assert str(msg["Subject"]).startswith(
        "[coalition-watch] digest 2026-01-06 09:00–10:00 UTC: 3 alerts, 3 articles (coalition)"
    )
    assert str(msg["Message-ID"]).startswith("<cw-digest-digest-20260106T0900-")
    text, _html = parts(msg)
    assert all(f"Article {i}" in text for i in range(3))


def test_bad_email_targets_fail_at_load_with_their_name(tmp_path: Path) -> None:
    base = {"name": "desk", "kind": "email", "host": "smtp.example", "from": "a@b.example",
            "to": ["c@d.example"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"target 'desk': to: 'nobody' is not an email address"):
        parse_target({**base, "to": ["nobody"]}, 0)
    with pytest.raises(ValueError, match=r"target 'desk': security: "):
        parse_target({**base, "security": "ssl"}, 0)
    with pytest.raises(ValueError, match=r"target 'desk': .*needs a password or password_file"):
        parse_target({**base, "username": "u"}, 0)
    with pytest.raises(ValueError, match=r"cannot read password_file"):
        parse_target({**base, "username": "u", "password_file": str(tmp_path / "none")}, 0)
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n", encoding="utf-8")
    ok = parse_target({**base, "username": "u", "password_file": str(secret)}, 0)
    assert ok.login_password == "s3cret"  # type: ignore[attr-defined]
    assert ok.port == 587 and ok.security == "starttls"  # type: ignore[attr-defined]
    assert timedelta(seconds=30) == ok.timeout  # type: ignore[attr-defined]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "the TLS tests need the openssl command to make a test certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_starttls_and_implicit_tls_with_login(
    sessions: SessionFactory, clock: Clock, tls_files: tuple[Path, Path], tmp_path: Path,
    security: str,
) -> None:  # fmt: skip
    cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth: Any) -> Any:
        logins.append((auth.login, auth.password))
        return AuthResult(success=auth.login == b"alerts" and auth.password == b"s3cret")

    sink = MailSink()
    port = free_port()
    tls_options: dict[str, Any] = (
        {"tls_context": context, "require_starttls": True, "auth_require_tls": True}
        if security == "starttls"
        # aiosmtpd only counts STARTTLS as TLS for auth_require_tls; this socket is all TLS.
        else {"ssl_context": context, "auth_require_tls": False}
    )
    controller = Controller(
        sink, hostname="127.0.0.1", port=port, authenticator=authenticator, **tls_options,
    )  # fmt: skip
    controller.start()
    try:
        password = tmp_path / "smtp-password"
        password.write_text("s3cret\n", encoding="utf-8")
        target = email_target(
            "desk", port, security=security, username="alerts", password_file=str(password),
            ca_file=str(cert),
        )  # fmt: skip
        pipe = Pipeline(sessions, clock, [target])
        add_article(sessions, story_id=add_story(sessions, "s"))
        pipe.evaluate()
        clock.advance(minutes=2)
        pipe.flush()
        assert (await pipe.deliver()).outcomes == {("email", "sent"): 1}
        assert len(sink.messages) == 1 and logins == [(b"alerts", b"s3cret")]
        # Without the CA the server's certificate is refused: permanent, with the reason.
        untrusted = email_target("desk", port, security=security, username="alerts",
                                 password="s3cret")  # fmt: skip
        pipe = Pipeline(sessions, clock, [untrusted])
        add_article(sessions, story_id=add_story(sessions, "s2"))
        pipe.evaluate()
        clock.advance(minutes=2)
        pipe.flush()
        assert (await pipe.deliver()).outcomes == {("email", "dead"): 1}
        with sessions() as s:
            last = s.exec(select(Delivery).order_by(col(Delivery.id).desc())).first()
        assert last is not None and last.last_error is not None
        assert "TLS certificate rejected" in last.last_error
    finally:
        controller.stop()
