"""Polling end to end: conditional GET, schedule, backoff and recovery, dedup, updates."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime
from html import escape

import pytest
from sqlmodel import select

from collectors.feeds import FeedOptions, count_states, feed_state
from collectors.schedule import observed_entry_gap
from storage.claims import claim
from storage.db import transaction
from storage.models import Article, Feed
from tests.collectors.conftest import DATA, START, Poller, feed_options
from tests.collectors.feedserver import FeedServer, Reply, Request, conditional


@dataclass
class Item:
    guid: str
    title: str
    text: str
    link: str | None = None
    published: datetime | None = None


def rss(items: list[Item], *, ttl: int | None = None, title: str = "Test feed") -> bytes:
    """A small RSS 2.0 document written by the tests."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel>',
        f"<title>{escape(title)}</title><link>https://site.example.org/</link>",
        "<language>en</language>",
    ]
    if ttl is not None:
        parts.append(f"<ttl>{ttl}</ttl>")
    for item in items:
        parts.append("<item>")
        parts.append(f'<guid isPermaLink="false">{escape(item.guid)}</guid>')
        parts.append(f"<title>{escape(item.title)}</title>")
        if item.link:
            parts.append(f"<link>{escape(item.link)}</link>")
        if item.published:
            parts.append(f"<pubDate>{format_datetime(item.published)}</pubDate>")
        parts.append(f"<description>{escape(item.text)}</description></item>")
    parts.append("</channel></rss>")
    return "".join(parts).encode()


STORY = (
    "European defence ministers agreed on Tuesday on the command structure of a multinational "
    "force that would deploy to Ukraine once a ceasefire is in place."
)


class Switch:
    """A route whose answer the test changes between polls."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def __call__(self, request: Request) -> Reply:
        return self.reply


async def test_second_poll_is_conditional_and_stores_nothing(
    feed_server: FeedServer, poller: Poller
):
    url = feed_server.document("/it.xml", (DATA / "coalition_it.xml").read_bytes())
    feed_id = poller.add(url)

    first = await poller.poll()
    feed = poller.feed(feed_id)
    assert [p.outcome for p in first.polls] == ["ok"] and first.added == 3
    assert feed.etag and feed.last_modified and feed.body_hash
    assert feed.title == "Cronache di prova – Esteri" and feed.language == "it"
    assert feed_server.hits("/it.xml")[0].headers.get("if-none-match") is None

    second = await poller.poll_when_due(feed_id)

    request = feed_server.hits("/it.xml")[-1]
    assert request.headers["if-none-match"] == feed.etag
    assert request.headers["if-modified-since"] == feed.last_modified
    assert [p.outcome for p in second.polls] == ["not_modified"] and second.added == 0
    assert len(poller.articles()) == 3
    after = poller.feed(feed_id)
    assert after.last_success_at == poller.clock() and after.polls_since_unconditional == 1


async def test_stored_articles_are_normalized(feed_server: FeedServer, poller: Poller):
    url = feed_server.document("/it.xml", (DATA / "coalition_it.xml").read_bytes())
    poller.add(url)
    await poller.poll()
    by_guid = {a.guid: a for a in poller.articles()}
    paris = by_guid["esteri-1001"]
    assert paris.url == "https://notizie.example.it/esteri/2026/01/06/volenterosi-parigi.html"
    assert paris.text == (
        "I leader della Coalizione dei volenterosi si riuniscono a Parigi.\n\n"
        "Sul tavolo l'invio di una forza di rassicurazione dopo un cessate il fuoco."
    )
    assert paris.published_at == datetime.fromisoformat("2026-01-06T09:15:00+00:00")
    assert paris.published_source == "entry" and paris.language == "it"
    assert paris.uid.startswith("feed:") and paris.uid.endswith(":esteri-1001")
    assert paris.outlet == "Cronache di prova – Esteri"
    usa = by_guid["esteri-1000"]
    # Relative link resolved against the site, fragment dropped; script and boilerplate gone.
    assert usa.url == "https://notizie.example.it/esteri/2026/01/05/garanzie-sicurezza.html"
    assert "trackView" not in usa.text and "appeared first" not in usa.text
    assert usa.text.count("\n\n") == 1 and "previsto — ha detto" in usa.text
    assert usa.title == "Garanzie di sicurezza, l’Italia chiede un ruolo degli Stati Uniti"


async def test_unconditional_poll_every_n_catches_a_stale_etag(
    feed_server: FeedServer, poller: Poller
):
    poller.options = feed_options(unconditional_every=3)
    state = {"body": rss([Item("a", "First story", STORY, "https://x.example/a")])}

    def sticky(request: Request) -> Reply:
        # A server that keeps its ETag after the content changed.
        if request.headers.get("if-none-match") == '"sticky"':
            return Reply(304, {"ETag": '"sticky"'})
        return Reply(
            200, {"ETag": '"sticky"', "Content-Type": "application/rss+xml"}, state["body"]
        )

    feed_id = poller.add(feed_server.route("/sticky.xml", sticky))
    await poller.poll()
    state["body"] = rss(
        [
            Item("b", "Second story", STORY + " More.", "https://x.example/b"),
            Item("a", "First story", STORY, "https://x.example/a"),
        ]
    )
    outcomes = []
    for _ in range(3):
        outcomes += [p.outcome for p in (await poller.poll_when_due(feed_id)).polls]

    assert outcomes == ["not_modified", "not_modified", "ok"]
    sent = [r.headers.get("if-none-match") for r in feed_server.hits("/sticky.xml")]
    assert sent == [None, '"sticky"', '"sticky"', None]
    assert {a.guid for a in poller.articles()} == {"a", "b"}


async def test_same_body_without_validators_is_not_parsed_again(
    feed_server: FeedServer, poller: Poller
):
    body = rss([Item("a", "Story", STORY, "https://x.example/a")])
    feed_id = poller.add(feed_server.route("/plain.xml", lambda _r: Reply(200, {}, body)))
    await poller.poll()
    again = await poller.poll_when_due(feed_id)
    assert [p.outcome for p in again.polls] == ["unchanged"]
    assert len(poller.articles()) == 1


async def test_backoff_grows_while_failing_and_the_feed_recovers(
    feed_server: FeedServer, poller: Poller
):
    poller.options = feed_options(backoff_base=60, backoff_cap=1800, unhealthy_after=4)
    route = Switch(Reply(500, {}, b"down"))
    feed_id = poller.add(feed_server.route("/flaky.xml", route))
    delays, states = [], []
    for _ in range(8):
        await poller.poll_when_due(feed_id)
        feed = poller.feed(feed_id)
        assert feed.next_check_at is not None and feed.enabled
        delays.append((feed.next_check_at - poller.clock()).total_seconds())
        states.append(feed_state(feed, poller.options.unhealthy_after))

    assert poller.feed(feed_id).consecutive_failures == 8
    assert all(b >= a for a, b in itertools.pairwise(delays)), delays
    assert 60 <= delays[0] < 120 and delays[-1] == 1800 and max(delays) == 1800
    assert states[:3] == ["failing"] * 3 and states[3:] == ["unhealthy"] * 5
    assert "backoff" in (poller.feed(feed_id).next_check_reason or "")
    with poller.sessions() as session:
        assert count_states(session, 4)["unhealthy"] == 1
    # Retried at the cap forever: it is still claimed when due.
    route.reply = Reply(
        200, {"Content-Type": "application/rss+xml"}, rss([Item("a", "Back", STORY)])
    )

    healed = await poller.poll_when_due(feed_id)

    feed = poller.feed(feed_id)
    assert [p.outcome for p in healed.polls] == ["ok"] and healed.added == 1
    assert feed.consecutive_failures == 0 and feed.last_error is None
    assert feed.last_success_at == poller.clock()
    assert feed_state(feed, 4) == "ok" and healed.unhealthy == 0


async def test_ttl_and_max_age_push_the_next_check_later(feed_server: FeedServer, poller: Poller):
    items = [Item(str(i), f"Story {i}", STORY, f"https://x.example/{i}") for i in range(3)]
    ttl_id = poller.add(feed_server.document("/ttl.xml", rss(items, ttl=180)))
    cached = rss(items, title="Cached")
    age_id = poller.add(
        feed_server.route(
            "/age.xml",
            conditional(cached, "application/rss+xml", extra={"Cache-Control": "max-age=7200"}),
        )
    )
    await poller.poll()

    ttl_feed, age_feed = poller.feed(ttl_id), poller.feed(age_id)
    assert ttl_feed.next_check_at == poller.clock() + timedelta(minutes=180)
    assert "<ttl>" in (ttl_feed.next_check_reason or "") and ttl_feed.ttl_seconds == 10800
    assert age_feed.next_check_at == poller.clock() + timedelta(hours=2)
    assert "max-age" in (age_feed.next_check_reason or "")
    # After a 304 the ttl from the last document still holds.
    await poller.poll_when_due(ttl_id)
    ttl_feed = poller.feed(ttl_id)
    assert ttl_feed.next_check_at == poller.clock() + timedelta(minutes=180)


def _dated(every: timedelta, count: int, newest: datetime) -> list[Item]:
    return [
        Item(
            f"g{i}",
            f"Story {i}",
            f"{STORY} Part {i}.",
            f"https://x.example/{i}",
            newest - i * every,
        )
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("every", "expected", "reason"),
    [
        (timedelta(minutes=2), timedelta(minutes=5), "minimum"),
        (timedelta(hours=3), None, "adaptive"),
        (timedelta(days=3), timedelta(hours=24), "maximum"),
    ],
)
async def test_interval_adapts_to_the_publishing_rate(
    every: timedelta,
    expected: timedelta | None,
    reason: str,
    feed_server: FeedServer,
    poller: Poller,
):
    newest = START - timedelta(minutes=1)
    items = _dated(every, 10, newest)
    feed_id = poller.add(feed_server.document("/rate.xml", rss(items)))

    await poller.poll()

    feed = poller.feed(feed_id)
    assert feed.next_check_at is not None
    delay = feed.next_check_at - poller.clock()
    gap = observed_entry_gap([i.published for i in items if i.published], START)
    assert gap is not None and feed.publish_interval == round(gap)
    if expected is None:
        expected = timedelta(seconds=gap * 0.5)
    assert abs(delay - expected) < timedelta(seconds=2)
    assert reason in (feed.next_check_reason or "")


async def test_fixed_interval_is_kept(feed_server: FeedServer, poller: Poller):
    items = _dated(timedelta(minutes=2), 10, START)
    feed_id = poller.add(feed_server.document("/fixed.xml", rss(items)), interval=3600)
    await poller.poll()
    feed = poller.feed(feed_id)
    assert feed.next_check_at == poller.clock() + timedelta(hours=1)
    assert "fixed interval" in (feed.next_check_reason or "")


async def test_undated_feed_uses_the_default_interval(feed_server: FeedServer, poller: Poller):
    items = [Item(str(i), f"Story {i}", STORY, f"https://x.example/{i}") for i in range(5)]
    feed_id = poller.add(feed_server.document("/undated.xml", rss(items)))
    await poller.poll()
    feed = poller.feed(feed_id)
    assert feed.next_check_at == poller.clock() + timedelta(minutes=15)
    assert feed.next_check_reason == "every 15 min (default interval)"


async def test_same_story_in_two_feeds_is_stored_once(feed_server: FeedServer, poller: Poller):
    shared_text = STORY + " The headquarters would be in Paris."
    one = rss(
        [
            Item("one-1", "Force HQ agreed", shared_text, "https://wire.example.com/hq"),
            Item("one-2", "Sanctions package", STORY + " Sanctions.", "https://wire.example.com/s"),
        ]
    )
    two = rss(
        [
            # Same article, its link decorated with tracking parameters and a fragment.
            Item(
                "two-9",
                "Force HQ agreed",
                shared_text,
                "https://wire.example.com/hq?utm_source=x#top",
            ),
            # The same story syndicated under another URL: same title and text.
            Item(
                "two-8", "Sanctions package", STORY + " Sanctions.", "https://mirror.example.net/s"
            ),
            Item("two-7", "Another story", STORY + " Other.", "https://mirror.example.net/o"),
        ]
    )
    first = poller.add(feed_server.document("/one.xml", one))
    second = poller.add(feed_server.document("/two.xml", two))

    result = await poller.poll()

    # Whichever feed is stored first keeps the story; the other's copy is skipped.
    assert result.added == 3 and result.duplicates == 2
    titles = sorted(a.title for a in poller.articles())
    assert titles == ["Another story", "Force HQ agreed", "Sanctions package"]
    assert len(poller.articles(first)) + len(poller.articles(second)) == 3
    assert "Another story" in {a.title for a in poller.articles(second)}
    # Polling again changes nothing.
    poller.clock.advance(86_400 * 2)
    again = await poller.poll()
    assert again.added == 0 and len(poller.articles()) == 3


async def test_updated_entry_updates_its_article(feed_server: FeedServer, poller: Poller):
    route = Switch(
        Reply(200, {}, rss([Item("live-1", "Talks begin", STORY, "https://x.example/l")]))
    )
    feed_id = poller.add(feed_server.route("/live.xml", route))
    await poller.poll()
    (article,) = poller.articles()
    with transaction(poller.sessions) as session:  # the classifier has been through it
        stored = session.get(Article, article.id)
        assert stored is not None
        stored.status = "classified"
    route.reply = Reply(
        200,
        {},
        rss(
            [Item("live-1", "Talks end without a deal", STORY + " No deal.", "https://x.example/l")]
        ),
    )

    result = await poller.poll_when_due(feed_id)

    assert result.updated == 1 and result.added == 0
    (updated,) = poller.articles()
    assert updated.id == article.id and updated.uid == article.uid
    assert updated.title == "Talks end without a deal" and updated.text.endswith("No deal.")
    assert updated.updated_at == poller.clock() and updated.status == "new"
    assert updated.fetched_at == article.fetched_at and updated.content_hash != article.content_hash


async def test_guid_fallbacks_and_repeated_guids(feed_server: FeedServer, poller: Poller):
    body = (
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>'
        b"<item><title>Linked only</title><link>https://x.example/p</link></item>"
        b"<item><title>Title only</title><description>Just a title and a line.</description></item>"
        b"<item><guid>dup</guid><title>First copy</title></item>"
        b"<item><guid>dup</guid><title>Second copy</title></item>"
        b"</channel></rss>"
    )
    feed_id = poller.add(feed_server.document("/fallback.xml", body))
    await poller.poll()
    guids = sorted(a.guid for a in poller.articles())
    assert guids[0] == "dup" and guids[1] == "https://x.example/p" and guids[2].startswith("title:")
    assert "repeats an earlier entry's id" in (poller.feed(feed_id).last_warning or "")


async def test_feeds_claimed_elsewhere_are_left_alone(feed_server: FeedServer, poller: Poller):
    feed_id = poller.add(feed_server.document("/claimed.xml", rss([Item("a", "A", STORY)])))
    taken = claim(
        poller.sessions, Feed, where=[Feed.id == feed_id], order_by=[Feed.id], limit=1,
        owner="other-replica", lease=timedelta(minutes=10), now=poller.clock(),
    )  # fmt: skip
    assert len(taken) == 1
    result = await poller.poll()
    assert result.polls == [] and feed_server.hits("/claimed.xml") == []


async def test_a_feed_is_polled_once_per_run(feed_server: FeedServer, poller: Poller):
    poller.options = FeedOptions.model_validate(
        {**feed_options().model_dump(), "backoff_base": 1, "backoff_cap": 1}
    )
    feed_server.route("/zero.xml", lambda _r: Reply(503, {"Retry-After": "0"}))
    feed_id = poller.add(feed_server.url("/zero.xml"))
    result = await poller.poll()
    assert len(result.polls) == 1 and len(feed_server.hits("/zero.xml")) == 1
    with poller.sessions() as session:
        assert session.exec(select(Feed).where(Feed.id == feed_id)).one().claimed_by is None
