"""The JSON API: articles with their classification, stories, alerts, feeds, silences.

Reads are open (bind to localhost or put a proxy in front); writes need
``Authorization: Bearer <api_token>``, and with no token configured every write is refused.
Lists use cursor pagination: pass the ``next_cursor`` of one page as ``cursor`` for the next.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, Generic, TypeVar

import sqlalchemy as sa
import sqlalchemy.orm
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from service.context import AppContext
from storage.models import Alert, Article, Classification, Feed, Silence, Story

MAX_LIMIT = 200


class ClassificationOut(BaseModel):
    model_version: str
    relevant: bool
    relevance_score: float
    topics: list[str]
    topic_scores: dict[str, float]
    stance: str
    stance_score: float


class ArticleOut(BaseModel):
    id: int
    source: str
    feed_id: int | None
    url: str | None
    outlet: str | None
    title: str
    language: str | None
    published_at: datetime | None
    fetched_at: datetime
    story_id: int | None
    status: str
    classification: ClassificationOut | None = None
    text: str | None = None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")


class StoryOut(BaseModel):
    id: int
    title: str
    first_seen_at: datetime
    last_seen_at: datetime
    article_count: int
    source_count: int


class AlertOut(BaseModel):
    id: int
    rule: str
    group_key: str
    severity: str
    story_id: int | None
    article_ids: list[int]
    fired_at: datetime
    status: str
    notified_at: datetime | None


class FeedOut(BaseModel):
    id: int
    url: str
    title: str | None
    enabled: bool
    interval: int
    next_check_at: datetime | None
    next_check_reason: str | None
    last_success_at: datetime | None
    consecutive_failures: int
    last_error: str | None
    last_error_kind: str | None


class FeedIn(BaseModel):
    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://")
    interval: int | None = Field(None, ge=60, le=86400, description="seconds")


class SilenceIn(BaseModel):
    rule: str = Field(min_length=1, max_length=128)
    story_id: int | None = None
    duration: str = Field("6h", pattern=r"^\d+(s|m|h|d)$", description="e.g. 30m, 6h, 2d")
    comment: str | None = Field(None, max_length=2000)


class SilenceOut(BaseModel):
    id: int
    rule: str
    story_id: int | None
    starts_at: datetime
    ends_at: datetime
    comment: str | None
    created_by: str | None


def _encode_cursor(value: int) -> str:
    return base64.urlsafe_b64encode(str(value).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return int(base64.urlsafe_b64decode(padded.encode()).decode())
    except (ValueError, binascii.Error) as exc:
        raise HTTPException(400, f"invalid cursor {cursor!r}") from exc


def _duration(text: str) -> timedelta:
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
    return timedelta(seconds=int(text[:-1]) * unit)


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with ctx.sessions() as s:
        yield s


SessionDep = Annotated[Session, Depends(get_session)]


def require_token(ctx: CtxDep, authorization: Annotated[str | None, Header()] = None) -> str:
    token = ctx.settings.api_token
    if token is None:
        raise HTTPException(403, "writes are disabled: no api_token is configured")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return "api"


Writer = Annotated[str, Depends(require_token)]


def build_router(ctx: AppContext) -> APIRouter:
    router = APIRouter(prefix="/api")

    def latest_classifications(s: Session, ids: list[int]) -> dict[int, Classification]:
        if not ids:
            return {}
        rows = s.exec(
            select(Classification)
            .where(col(Classification.article_id).in_(ids))
            .order_by(col(Classification.id))
        ).all()
        return {c.article_id: c for c in rows}  # the newest wins

    def article_out(a: Article, c: Classification | None, full: bool) -> ArticleOut:
        assert a.id is not None
        return ArticleOut(
            id=a.id, source=a.source, feed_id=a.feed_id, url=a.url, outlet=a.outlet,
            title=a.title, language=a.language, published_at=a.published_at,
            fetched_at=a.fetched_at, story_id=a.story_id, status=a.status,
            classification=ClassificationOut.model_validate(c, from_attributes=True) if c else None,
            text=a.text if full else None,
        )  # fmt: skip

    @router.get("/articles", response_model=Page[ArticleOut])
    def list_articles(
        s: SessionDep,
        relevant: bool | None = None,
        topic: str | None = None,
        stance: str | None = None,
        language: str | None = None,
        since: Annotated[datetime | None, Query(description="fetched at or after (ISO 8601)")] = (
            None
        ),
        q: Annotated[str | None, Query(max_length=200, description="words in title/text")] = None,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    ) -> Page[ArticleOut]:
        stmt: Any = select(Article)
        if relevant is not None or topic or stance:
            inner = sa.orm.aliased(Classification)
            newest = (
                sa.select(sa.func.max(col(inner.id)))
                .where(col(inner.article_id) == col(Article.id))
                .correlate(Article)
                .scalar_subquery()
            )
            stmt = stmt.join(Classification, col(Classification.id) == newest)
            if relevant is not None:
                stmt = stmt.where(col(Classification.relevant) == relevant)
            if topic:
                stmt = stmt.where(sa.cast(Classification.topics, sa.String).like(f'%"{topic}"%'))
            if stance:
                stmt = stmt.where(col(Classification.stance) == stance)
        if language:
            stmt = stmt.where(col(Article.language) == language)
        if since:
            if since.tzinfo is None:
                raise HTTPException(400, "since must carry a timezone, e.g. 2026-01-06T00:00:00Z")
            stmt = stmt.where(col(Article.fetched_at) >= since)
        if q:
            for word in q.split():
                pattern = f"%{word}%"
                stmt = stmt.where(
                    sa.or_(col(Article.title).ilike(pattern), col(Article.text).ilike(pattern))
                )
        after = _decode_cursor(cursor)
        if after is not None:
            stmt = stmt.where(col(Article.id) < after)
        rows: list[Article] = list(s.exec(stmt.order_by(col(Article.id).desc()).limit(limit + 1)))
        more = len(rows) > limit
        rows = rows[:limit]
        cls = latest_classifications(s, [a.id for a in rows if a.id is not None])
        items = [article_out(a, cls.get(a.id or 0), full=False) for a in rows]
        next_cursor = _encode_cursor(rows[-1].id) if more and rows[-1].id else None
        return Page[ArticleOut](items=items, next_cursor=next_cursor)

    @router.get("/articles/{article_id}", response_model=ArticleOut)
    def get_article(article_id: int, s: SessionDep) -> ArticleOut:
        a = s.get(Article, article_id)
        if a is None:
            raise HTTPException(404, f"no article with id {article_id}")
        return article_out(a, latest_classifications(s, [article_id]).get(article_id), True)

    def _page(s: Session, model: Any, out: Any, cursor: str | None, limit: int) -> Any:
        stmt = select(model)
        after = _decode_cursor(cursor)
        if after is not None:
            stmt = stmt.where(model.id < after)
        rows = list(s.exec(stmt.order_by(model.id.desc()).limit(limit + 1)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return Page[out](
            items=[out.model_validate(r, from_attributes=True) for r in rows],
            next_cursor=_encode_cursor(rows[-1].id) if more and rows else None,
        )

    @router.get("/stories", response_model=Page[StoryOut])
    def list_stories(
        s: SessionDep,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    ) -> Any:
        return _page(s, Story, StoryOut, cursor, limit)

    @router.get("/alerts", response_model=Page[AlertOut])
    def list_alerts(
        s: SessionDep,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    ) -> Any:
        return _page(s, Alert, AlertOut, cursor, limit)

    @router.get("/feeds", response_model=Page[FeedOut])
    def list_feeds(
        s: SessionDep,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
    ) -> Any:
        return _page(s, Feed, FeedOut, cursor, limit)

    @router.post("/feeds", response_model=FeedOut, status_code=201)
    def add_feed(body: FeedIn, s: SessionDep, _w: Writer) -> Any:
        existing = s.exec(select(Feed).where(col(Feed.url) == body.url)).first()
        if existing is not None:
            raise HTTPException(409, f"feed {body.url} already exists (id {existing.id})")
        feed = Feed(url=body.url, next_check_at=ctx.clock(), next_check_reason="new feed")
        if body.interval:
            feed.interval = body.interval
        s.add(feed)
        s.commit()
        s.refresh(feed)
        return FeedOut.model_validate(feed, from_attributes=True)

    @router.delete("/feeds/{feed_id}", status_code=204)
    def remove_feed(feed_id: int, s: SessionDep, _w: Writer) -> None:
        feed = s.get(Feed, feed_id)
        if feed is None:
            raise HTTPException(404, f"no feed with id {feed_id}")
        s.delete(feed)  # its articles stay, with feed_id set to NULL
        s.commit()

    @router.get("/silences", response_model=Page[SilenceOut])
    def list_silences(
        s: SessionDep,
        cursor: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    ) -> Any:
        return _page(s, Silence, SilenceOut, cursor, limit)

    @router.post("/silences", response_model=SilenceOut, status_code=201)
    def create_silence(body: SilenceIn, s: SessionDep, who: Writer) -> Any:
        now = ctx.clock()
        silence = Silence(
            rule=body.rule, story_id=body.story_id, starts_at=now,
            ends_at=now + _duration(body.duration), comment=body.comment, created_by=who,
        )  # fmt: skip
        s.add(silence)
        s.commit()
        s.refresh(silence)
        return SilenceOut.model_validate(silence, from_attributes=True)

    @router.delete("/silences/{silence_id}", response_model=SilenceOut)
    def expire_silence(silence_id: int, s: SessionDep, _w: Writer) -> Any:
        silence = s.get(Silence, silence_id)
        if silence is None:
            raise HTTPException(404, f"no silence with id {silence_id}")
        now = ctx.clock()
        if silence.ends_at > now:
            silence.ends_at = now
            s.add(silence)
            s.commit()
            s.refresh(silence)
        return SilenceOut.model_validate(silence, from_attributes=True)

    return router
