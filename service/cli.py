"""The ``coalition-watch`` command line.

Every command takes ``--config PATH`` (or ``$COALITION_WATCH_CONFIG``). Stage-specific command
groups live in their own modules (``service/cli_*.py``) and are attached here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import select

from collectors.seeds import ingest_seeds
from service.cli_alerts import alerts_app, require_valid_rules
from service.cli_feeds import collect_cmd, feeds_app
from service.cli_model import classify_cmd, model_app, stories_app
from service.config import ConfigError, Settings, load_settings
from service.context import AppContext, build_context
from service.logs import setup_logging
from storage import migrate
from storage.db import transaction
from storage.models import Article

app = typer.Typer(
    name="coalition-watch",
    help="Watch the news about the Coalition of the Willing for Ukraine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
ingest_app = typer.Typer(help="Ingest articles.", no_args_is_help=True)
articles_app = typer.Typer(help="Stored articles.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(ingest_app, name="ingest")
app.add_typer(articles_app, name="articles")
app.add_typer(alerts_app, name="alerts")
app.add_typer(feeds_app, name="feeds")
app.command("collect")(collect_cmd)
app.add_typer(model_app, name="model")
app.add_typer(stories_app, name="stories")
app.command("classify")(classify_cmd)


class State:
    config_file: Path | None = None
    settings: Settings | None = None


_state = State()


@app.callback()
def _main(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (default: $COALITION_WATCH_CONFIG)."),
    ] = None,
) -> None:
    _state.config_file = config
    _state.settings = None


def settings() -> Settings:
    """The settings for this invocation; a bad value exits 2 with the setting named."""
    if _state.settings is None:
        try:
            _state.settings = load_settings(_state.config_file)
        except ConfigError as exc:
            typer.echo(f"configuration error: {exc}", err=True)
            raise typer.Exit(2) from exc
        setup_logging(_state.settings.log.level, _state.settings.log.json_format)
    return _state.settings


def context() -> AppContext:
    return build_context(settings())


def require_schema(ctx: AppContext) -> None:
    """Refuse to work on a database whose schema is missing or old."""
    if not migrate.is_up_to_date(ctx.engine):
        typer.echo(
            "the database schema is missing or out of date: run `coalition-watch db upgrade`",
            err=True,
        )
        raise typer.Exit(2)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the schema, or upgrade it to the newest migration."""
    s = settings()
    migrate.upgrade(s.database_url)
    typer.echo(f"database at {_safe_url(s.database_url)} is up to date")


@ingest_app.command("seeds")
def ingest_seeds_cmd(
    folder: Annotated[
        Path | None, typer.Argument(help="Seed folder (default: the seeds_dir setting).")
    ] = None,
) -> None:
    """Store the seed folder's articles (files already stored are skipped)."""
    ctx = context()
    require_schema(ctx)
    folder = folder or ctx.settings.seeds_dir
    if not folder.is_dir():
        typer.echo(
            f"no seed folder at {folder.resolve()}: pass one (`coalition-watch ingest seeds DIR`) "
            "or set seeds_dir (COALITION_WATCH_SEEDS_DIR)",
            err=True,
        )
        raise typer.Exit(1)
    try:
        with transaction(ctx.sessions) as session:
            result = ingest_seeds(session, folder, ctx.clock())
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    typer.echo(
        f"seeds from {folder}: {result.added} added, {result.updated} updated, "
        f"{result.unchanged} unchanged, {result.failed} rejected"
    )
    if result.failed:
        raise typer.Exit(1)


@articles_app.command("list")
def articles_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
) -> None:
    """List stored articles: id, published date, language, title."""
    ctx = context()
    require_schema(ctx)
    with ctx.sessions() as session:
        rows = session.exec(
            select(Article).order_by(Article.id.desc()).limit(limit)  # type: ignore[union-attr]
        ).all()
    if as_json:
        out = [
            {
                "id": a.id,
                "published": a.published_at.date().isoformat() if a.published_at else None,
                "language": a.language,
                "title": a.title,
                "source": a.source,
                "status": a.status,
            }
            for a in rows
        ]
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    for a in rows:
        published = a.published_at.date().isoformat() if a.published_at else "-" * 10
        typer.echo(f"{a.id:>6}  {published}  {a.language or '--':<3} {a.title}")


@articles_app.command("show")
def articles_show(article_id: Annotated[int, typer.Argument(help="Article id.")]) -> None:
    """Show one article in full."""
    ctx = context()
    require_schema(ctx)
    with ctx.sessions() as session:
        a = session.get(Article, article_id)
    if a is None:
        typer.echo(f"no article with id {article_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"# {a.title}\n")
    typer.echo(f"id:         {a.id}")
    typer.echo(f"source:     {a.source} ({a.outlet or '-'})")
    typer.echo(f"url:        {a.url or '-'}")
    typer.echo(f"language:   {a.language or '-'}")
    typer.echo(f"published:  {a.published_at.isoformat() if a.published_at else '-'}")
    typer.echo(f"fetched:    {a.fetched_at.isoformat()}")
    typer.echo(f"status:     {a.status}")
    typer.echo(f"story:      {a.story_id or '-'}")
    typer.echo("")
    typer.echo(a.text)


@app.command("run")
def run_cmd() -> None:
    """Run the service until SIGINT/SIGTERM (after `db upgrade`).

    Jobs: seeds, feeds, classify, alerts, retention. HTTP: /healthz, /readyz, /metrics, /api.

    Listens on http.host:http.port (127.0.0.1:8000 by default).
    """
    from service.runner import run

    ctx = context()
    require_schema(ctx)
    require_valid_rules()
    try:
        run(ctx)
    finally:
        ctx.close()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised outside settings(), e.g. by a secret file
        print(f"configuration error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
