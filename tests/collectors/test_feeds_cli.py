"""The feed commands and the polling job, against a real local server and a real database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from typer.testing import CliRunner

from service.cli import app
from service.config import load_settings
from service.context import build_context
from service.jobs import job_specs, run_collect
from tests.collectors.conftest import DATA
from tests.collectors.feedserver import FeedServer, Reply
from tests.conftest import REPO

IT_FEED = (DATA / "coalition_it.xml").read_bytes()
PAGE = (DATA / "page_with_feed.html").read_bytes()


class Cli:
    def __init__(self, db_url: str) -> None:
        self.runner = CliRunner()
        self.env = {"COALITION_WATCH_DATABASE_URL": db_url, "COALITION_WATCH_LOG__LEVEL": "ERROR"}

    def __call__(self, *args: str, code: int = 0) -> str:
        result = self.runner.invoke(app, list(args), env=self.env)
        output = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code == code, f"{args}: exit {result.exit_code}\n{output}"
        return output


@pytest.fixture
def cli(db_url: str) -> Cli:
    return Cli(db_url)


@pytest.fixture
def site(feed_server: FeedServer) -> FeedServer:
    feed_server.route("/esteri/", lambda _r: Reply(200, {"Content-Type": "text/html"}, PAGE))
    feed_server.document("/feeds/esteri.xml", IT_FEED)
    feed_server.route("/gone.xml", lambda _r: Reply(404, {}, b"not here"))
    return feed_server


def test_add_discovers_the_feed_of_a_page_and_lists_it(cli: Cli, site: FeedServer) -> None:
    out = cli("feeds", "add", site.url("/esteri/"))
    feed_url = site.url("/feeds/esteri.xml")
    assert "is a web page; it announces the feed " + feed_url in out
    assert "with 3 entries" in out and "added feed #1" in out
    assert "already feed #1" in cli("feeds", "add", feed_url)

    (row,) = json.loads(cli("feeds", "list", "--json"))
    assert row["url"] == feed_url and row["title"] == "Cronache di prova – Esteri"
    assert row["status"] == "new" and row["consecutive_failures"] == 0
    assert row["interval_fixed"] is False and row["next_check_reason"].startswith("new feed")


def test_add_refuses_a_broken_url_unless_forced(cli: Cli, site: FeedServer) -> None:
    gone = site.url("/gone.xml")
    out = cli("feeds", "add", gone, code=1)
    assert gone in out and "404" in out
    assert "added feed #1" in cli("feeds", "add", gone, "--force", "--interval", "10m")
    (row,) = json.loads(cli("feeds", "list", "--json"))
    assert row["interval"] == 600 and row["interval_fixed"] is True
    assert "at least 60 s" in cli("feeds", "add", site.url("/x.xml"), "--interval", "5", code=2)
    assert "not an http(s) URL" in cli("feeds", "add", "ftp://x.example/f", code=2)


def test_collect_once_list_export_import_remove(cli: Cli, site: FeedServer, tmp_path: Path) -> None:
    cli("feeds", "add", site.url("/feeds/esteri.xml"))
    cli("feeds", "add", site.url("/gone.xml"), "--force")

    out = cli("collect", "--once")
    assert "polled 2 feeds: 1 ok, 0 not modified, 0 unchanged, 1 failed" in out
    assert "3 added" in out and "http_404" in out
    articles = json.loads(cli("articles", "list", "--json"))
    assert len(articles) == 3 and {a["source"] for a in articles} == {"feed"}
    # Nothing is due any more: a second pass polls nothing.
    assert "polled 0 feeds" in cli("collect", "--once")

    listing = cli("feeds", "list")
    assert "#1    ok" in listing and "#2    failing" in listing
    # The test feed's entries are from January 2026: a quiet feed, checked daily.
    assert "next check in 1 d: every 1 d (adaptive, the maximum: an entry every ~" in listing
    assert "error (http_404): " + site.url("/gone.xml") in listing
    assert "retry after 1 failure (http_404; backoff, cap 6 h)" in listing
    assert listing.rstrip().endswith("2 feeds: 1 ok, 1 failing")

    opml = cli("feeds", "export")
    assert site.url("/feeds/esteri.xml") in opml and "Cronache di prova" in opml
    exported = tmp_path / "export.opml"
    exported.write_text(opml, encoding="utf-8")
    assert "not imported (--if-empty)" in cli("feeds", "import", "--if-empty", str(exported))
    assert "imported 0 feeds" in cli("feeds", "import", str(exported))

    out = cli("feeds", "remove", "1")
    assert "removed feed #1" in out and "(3 stored articles kept)" in out
    assert len(json.loads(cli("articles", "list", "--json"))) == 3
    assert "removed feed #2" in cli("feeds", "remove", site.url("/gone.xml"))
    assert "no feed" in cli("feeds", "remove", "99", code=1)
    out = cli("feeds", "import", "--if-empty", str(exported))
    assert "imported 2 feeds" in out


def test_import_starter_list_into_an_empty_database(cli: Cli) -> None:
    starter = str(REPO / "collectors" / "starter.opml")
    out = cli("feeds", "import", "--if-empty", starter)
    assert out.startswith("imported 27 feeds")
    rows = json.loads(cli("feeds", "list", "--json"))
    assert len(rows) == 27 and {r["status"] for r in rows} == {"new"}
    assert "27 feeds already configured" in cli("feeds", "import", "--if-empty", starter)


def test_check_prints_entries_and_problems_and_writes_nothing(cli: Cli, site: FeedServer) -> None:
    out = cli("feeds", "check", site.url("/feeds/esteri.xml"), "--entries", "2")
    assert "http:     200 (application/rss+xml" in out and "cache:    etag" in out
    assert "entries:  3" in out and "format:   rss20" in out
    assert "1. Volenterosi a Parigi: il piano per la forza di rassicurazione" in out
    assert "2. Garanzie di sicurezza" in out and "3." not in out
    assert "1 entry has only an updated date" in out

    out = cli("feeds", "check", site.url("/esteri/"), code=1)
    assert "not_a_feed" in out and "announced feed: " + site.url("/feeds/esteri.xml") in out
    out = cli("feeds", "check", site.url("/gone.xml"), code=1)
    assert "error:    http_404" in out

    assert "error:    not_a_feed" in cli("feeds", "check", str(DATA / "nested.opml"), code=1)
    corrupt = cli("feeds", "check", str(DATA / "broken.opml"), code=1)
    assert "error:    parse: " in corrupt and "ill-formed XML at line 3" in corrupt
    assert "entries:  2" in cli("feeds", "check", str(DATA / "coalition_en.atom"))
    assert json.loads(cli("feeds", "list", "--json")) == []
    assert json.loads(cli("articles", "list", "--json")) == []


async def test_collect_job_records_metrics(db_url: str, feed_server: FeedServer) -> None:
    ctx = build_context(load_settings(database_url=db_url))
    try:
        assert "collect" in [spec.name for spec in job_specs(ctx)]
        from collectors.feeds import add_feed
        from storage.db import transaction

        with transaction(ctx.sessions) as session:
            add_feed(
                session, feed_server.document("/m.xml", IT_FEED), ctx.settings.feeds, ctx.clock()
            )
            add_feed(session, feed_server.url("/missing.xml"), ctx.settings.feeds, ctx.clock())

        result = await run_collect(ctx)

        assert sorted(p.outcome for p in result.polls) == ["http_404", "ok"]
        text = generate_latest(ctx.metrics.registry).decode()
        assert 'coalition_watch_feed_polls_total{outcome="ok"} 1.0' in text
        assert 'coalition_watch_feed_polls_total{outcome="http_404"} 1.0' in text
        assert 'coalition_watch_entries_ingested_total{result="added",source="feed"} 3.0' in text
        assert "coalition_watch_feed_fetch_duration_seconds_count 2.0" in text
        assert "coalition_watch_feeds_unhealthy 0.0" in text
        assert 'coalition_watch_feeds{state="enabled"} 2.0' in text
    finally:
        ctx.close()
