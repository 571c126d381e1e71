"""`academyd dataset build|backfill-git`: curate a dataset from the store, or seed it from git history."""

from __future__ import annotations

import argparse
from typing import Any

from academyd.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_json_arg,
    add_settings_args,
    fail,
    print_json,
    settings_from,
)
from academyd.settings import SettingsError


def register(sub: Any) -> None:
    parser = sub.add_parser("dataset", help="curate training datasets", description=__doc__)
    dsub = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)

    build = dsub.add_parser("build", help="build a dataset from everything the store holds")
    add_settings_args(build)
    add_json_arg(build)
    build.add_argument("--format", choices=["alpaca", "sharegpt"], help="override curator.format")
    build.add_argument("--no-announce", action="store_true", help="do not queue academy.dataset.built")
    build.set_defaults(func=_build)

    back = dsub.add_parser("backfill-git", help="record an allowlisted repository's history as commits")
    back.add_argument("repo", metavar="REPO", help="a repository name from the allowlist ([repos] in the config)")
    back.add_argument("--rev", default="HEAD", help="walk history reachable from this revision (default HEAD)")
    add_settings_args(back)
    add_json_arg(back)
    back.set_defaults(func=_backfill)


def _settings(args: argparse.Namespace) -> Any:
    extra: dict[str, Any] = {}
    settings = settings_from(args, **extra)
    if getattr(args, "format", None):
        settings.curator.format = args.format
    return settings


def _build(args: argparse.Namespace) -> int:
    from academyd.curator import build_dataset
    from academyd.store import Store, utcnow

    try:
        settings = _settings(args)
    except SettingsError as exc:
        return fail(str(exc), EXIT_USAGE)
    store = Store.open(settings.db_path)
    try:
        if args.json:
            result = build_dataset(settings, store, now=utcnow(), announce=not args.no_announce)
        else:
            result = _build_with_progress(settings, store, announce=not args.no_announce)
    finally:
        store.close()
    if args.json:
        print_json(result.summary())
    else:
        _print_summary(result)
    if result.refused:
        return fail(f"dataset refused: {result.refused}", EXIT_FAILED)
    return EXIT_OK


def _build_with_progress(settings: Any, store: Any, *, announce: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from academyd.curator import build_dataset
    from academyd.store import utcnow

    with Progress(TextColumn("{task.description:<8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        return build_dataset(settings, store, now=utcnow(), progress=progress, announce=announce)


def _print_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"dataset {result.dataset_id} ({result.format})")
    for col in ("source", "records", "train", "replay", "held-out", "dropped"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for source, c in result.counts.items():
        table.add_row(source, *(str(c[k]) for k in ("records", "train", "replay", "heldout", "dropped")))
    console.print(table)
    if result.dropped:
        reasons = Table(title="dropped, by reason")
        reasons.add_column("reason")
        reasons.add_column("examples", justify="right")
        for reason, n in sorted(result.dropped.items(), key=lambda kv: -kv[1]):
            reasons.add_row(reason, str(n))
        console.print(reasons)
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    console.print(f"stages: {stages}")
    if result.refused:
        console.print(f"[bold red]refused:[/] {result.refused}")
    else:
        console.print(f"train    {result.path}\nheld-out {result.heldout_path}\nmanifest {result.manifest_path}")
        console.print(f"content hash {result.content_hash}")


def _backfill(args: argparse.Namespace) -> int:
    from academyd.curator.backfill import backfill_git
    from academyd.curator.git import RepoNotAllowed
    from academyd.store import Store, utcnow

    try:
        settings = settings_from(args)
    except SettingsError as exc:
        return fail(str(exc), EXIT_USAGE)
    store = Store.open(settings.db_path)
    try:
        result = backfill_git(settings, store, args.repo, now=utcnow(), rev=args.rev)
    except RepoNotAllowed as exc:
        return fail(str(exc), EXIT_USAGE)
    finally:
        store.close()
    if args.json:
        print_json(result.__dict__)
    else:
        print(f"{result.repo} ({result.branch}): {result.commits} commits, {result.added} new, "
              f"{result.already_known} already known. Next: academyd dataset build")
    return EXIT_OK
