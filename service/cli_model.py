"""``coalition-watch model build|train|eval|info``, ``classify [--all]`` and ``stories list``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer
from sqlmodel import col

from processors.classifier import (
    DEFAULT_ENCODER,
    PACKAGE_DATA_DIR,
    Classifier,
    ClassifierOptions,
    evaluate_items,
    load_classifier,
)
from processors.e5convert import ConversionError, build_model, default_model_dir
from processors.heads import HeadsError
from processors.labelled import LabelledDataError, read_jsonl
from storage.models import Story

model_app = typer.Typer(help="The classifier: encoder, heads, evaluation.", no_args_is_help=True)
stories_app = typer.Typer(help="Stories: articles about one event.", no_args_is_help=True)


def _options() -> ClassifierOptions:
    from service.cli import settings

    return settings().classifier


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _ensure_encoder(options: ClassifierOptions) -> None:
    if options.encoder == DEFAULT_ENCODER:
        try:
            build_model(options.model_dir)
        except ConversionError as exc:
            raise _fail(f"cannot build the default encoder: {exc}") from exc


def _load(options: ClassifierOptions) -> Classifier:
    _ensure_encoder(options)
    try:
        return load_classifier(options)
    except (HeadsError, OSError) as exc:
        raise _fail(str(exc)) from exc


@model_app.command("build")
def model_build(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when complete.")] = False,
) -> None:
    """Build the default encoder (multilingual-e5-small) from the installed packages."""
    options = _options()
    folder = (options.model_dir or default_model_dir()).expanduser()
    try:
        result = build_model(folder, force=force)
    except ConversionError as exc:
        raise _fail(f"model build failed: {exc}") from exc
    if options.attention != "sdpa":  # before the precision is measured: it runs the model
        _build_attention_kernel(required=options.attention == "kernel")
    if result.built:
        typer.echo(f"built {DEFAULT_ENCODER} in {result.folder}")
        # A fresh build is a new machine or a new model: decide the precision now and record
        # it, so the service does not measure it at its first classification.
        try:
            classifier = load_classifier(options.model_copy(update={"model_dir": folder}))
        except (HeadsError, OSError) as exc:
            typer.echo(f"precision not decided yet: {exc}", err=True)
        else:
            typer.echo(f"precision: {classifier.precision_reason}")
    else:
        typer.echo(f"{DEFAULT_ENCODER} is already built in {result.folder}")


def _build_attention_kernel(*, required: bool) -> None:
    """Compile the CPU attention kernel now rather than at the service's first load."""
    from processors.attention import KernelBuildError, build_kernel, kernel_isa, load_kernel

    try:
        path = build_kernel()
        isa = kernel_isa(load_kernel())
    except KernelBuildError as exc:
        if required:
            raise _fail(f"attention kernel: {exc}") from exc
        typer.echo(f"attention kernel not built ({exc}); PyTorch's sdpa will be used", err=True)
    else:
        typer.echo(f"attention kernel ({isa}): {path}")


@model_app.command("train")
def model_train(
    data: Annotated[
        Path, typer.Option(help="Folder with train_*.jsonl and dev_*.jsonl.")
    ] = PACKAGE_DATA_DIR,
    out: Annotated[
        Path | None, typer.Option(help="Where to save the heads (default: heads_dir).")
    ] = None,
    cache: Annotated[
        bool, typer.Option(help="Reuse cached training-set vectors for the same text.")
    ] = True,
    bf16_check: Annotated[
        bool, typer.Option(help="Compare bfloat16 with float32 predictions on dev.")
    ] = True,
) -> None:
    """Train the heads on the train split; score them on the dev split; save them."""
    from processors.classifier import train

    options = _options()
    _ensure_encoder(options)
    try:
        result = train(
            options,
            data_dir=data,
            out_dir=out,
            use_cache=cache,
            check_bf16=bf16_check,
            say=lambda m: typer.echo(m, err=True),
        )
    except (LabelledDataError, ValueError, OSError, HeadsError) as exc:
        raise _fail(f"training failed: {exc}") from exc
    typer.echo(f"model_version {result.model_version}")
    if result.dev is not None:
        typer.echo("dev split:")
        typer.echo(result.dev.render())
    typer.echo(f"bfloat16 check: {json.dumps(result.precision_check)}")


@model_app.command("eval")
def model_eval(
    file: Annotated[Path, typer.Argument(help="Labelled JSONL file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Score the classifier on a labelled JSONL file."""
    if not file.is_file():
        raise _fail(f"no such file: {file}")
    try:  # a bad file fails before the model is loaded
        items = read_jsonl(file)
    except LabelledDataError as exc:
        raise _fail(str(exc)) from exc
    if not items:
        raise _fail(f"{file}: no labelled examples")
    classifier = _load(_options())
    report = evaluate_items(classifier, items)
    if as_json:
        sys.stdout.write(json.dumps(report.as_json(), ensure_ascii=False) + "\n")
        return
    typer.echo(f"{file}: model {classifier.model_version} ({classifier.encoder.precision})")
    typer.echo(report.render())


@model_app.command("info")
def model_info() -> None:
    """The configured encoder, heads, model_version and precision decision."""
    classifier = _load(_options())
    meta = classifier.heads.meta
    typer.echo(f"model_version  {classifier.model_version}")
    typer.echo(f"encoder        {classifier.encoder_id} ({_options().encoder_source()})")
    typer.echo(f"precision      {classifier.precision_reason}")  # it starts with the precision
    typer.echo(f"attention      {classifier.encoder.attention}")
    typer.echo(f"heads          {_options().heads_path()}")
    typer.echo(f"trained on     {json.dumps(meta.get('training_data', {}))}")
    typer.echo(f"dev metrics    {json.dumps(meta.get('dev_metrics', {}))}")


def classify_cmd(
    reclassify_all: Annotated[
        bool, typer.Option("--all", help="Reclassify every stored article.")
    ] = False,
) -> None:
    """Classify pending articles now (with --all: every stored article)."""
    from service.cli import context, require_schema
    from service.jobs import ClassifyJobs, free_dead_leases, run_classify

    ctx = context()
    require_schema(ctx)
    free_dead_leases(ctx, own_id_is_free=not ctx.settings.instance_id)
    jobs = ClassifyJobs(ctx.settings.classifier)
    _ensure_encoder(ctx.settings.classifier)
    try:
        jobs.classifier()
    except (HeadsError, OSError) as exc:
        raise _fail(str(exc)) from exc
    try:
        result = run_classify(ctx, jobs, reclassify_all=reclassify_all)
    finally:
        ctx.close()
    typer.echo(
        f"{result.classified} classified, {result.reclassified} reclassified "
        f"({result.relevant} relevant); {result.embedded} embedded, "
        f"{result.reused_embeddings} stored embeddings reused; stories: "
        f"{result.stories_created} new, {result.stories_joined} joined; "
        f"{result.skipped} skipped"
    )


@stories_app.command("list")
def stories_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many, latest first.")] = 50,
) -> None:
    """Stories, most recently seen first: articles, distinct sources, title."""
    from service.cli import context, require_schema

    ctx = context()
    require_schema(ctx)
    table: object = Story
    with ctx.sessions() as session:
        rows = (
            session.execute(
                sa.select(table)  # type: ignore[call-overload]
                .where(Story.article_count > 0)
                .order_by(col(Story.last_seen_at).desc(), col(Story.id).desc())
                .limit(limit)
            )
            .scalars()
            .all()
        )
    ctx.close()
    if as_json:
        out = [
            {
                "id": s.id,
                "title": s.title,
                "first_seen": s.first_seen_at.isoformat(),
                "last_seen": s.last_seen_at.isoformat(),
                "articles": s.article_count,
                "sources": s.source_count,
            }
            for s in rows
        ]
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    for s in rows:
        typer.echo(
            f"{s.id:>6}  {s.last_seen_at:%Y-%m-%d %H:%M}  {s.article_count:>3} articles  "
            f"{s.source_count:>2} sources  {s.title}"
        )
