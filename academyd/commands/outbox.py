"""`academyd outbox list|retry`: the outbound events that have not gone out, and a parked one sent again.

Reads the store (as `academyd dataset` does), so it works while the daemon runs or is down; the daemon's
relay picks an unparked row up within its next pass (see academyd.outbox).
"""

from __future__ import annotations

import argparse
from typing import Any

from academyd.commands.common import (
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
    parser = sub.add_parser("outbox", help="outbound events not yet published: list, retry parked ones",
                            description=__doc__)
    osub = parser.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)

    show = osub.add_parser("list", help="rows that failed: parked (the server refused them) or still retried")
    add_settings_args(show)
    add_json_arg(show)
    show.set_defaults(func=_list)

    retry = osub.add_parser("retry", help="unpark a parked row (or all of them) so the relay tries it again")
    retry.add_argument("id", metavar="ID", nargs="?", type=int, help="the row's id from `outbox list`")
    retry.add_argument("--all", action="store_true", help="unpark every parked row")
    add_settings_args(retry)
    add_json_arg(retry)
    retry.set_defaults(func=_retry)


def _open(args: argparse.Namespace) -> Any:
    from academyd.store import Store

    settings = settings_from(args)
    if not settings.db_path.exists():
        raise SettingsError(f"no store at {settings.db_path}: is --data-dir (or ACADEMY_DATA_DIR) right?")
    return Store.open(settings.db_path)


def _list(args: argparse.Namespace) -> int:
    try:
        store = _open(args)
    except SettingsError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        rows, counts = store.outbox_unsent(200), store.outbox_counts()
    finally:
        store.close()
    if args.json:
        print_json({"counts": counts, "rows": rows})
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Outbox: {counts['pending']} pending, {counts['parked']} parked", title_justify="left")
    for col in ("id", "subject", "msg id", "state", "attempts", "last error"):
        t.add_column(col)
    for r in rows:
        state = "[red]parked[/]" if r["parked_at"] else "[yellow]retrying[/]"
        t.add_row(str(r["id"]), r["subject"], r["msg_id"], state, str(r["attempts"]), str(r["last_error"] or ""))
    Console().print(t)
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    if (args.id is None) == (not args.all):
        return fail("name one row's ID (from `academyd outbox list`) or --all", EXIT_USAGE)
    try:
        store = _open(args)
    except SettingsError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        with store.transaction():
            n = store.outbox_unpark(None if args.all else args.id)
    finally:
        store.close()
    if args.json:
        print_json({"ok": n > 0, "unparked": n})
    else:
        print(f"unparked {n} row(s); the daemon's relay sends them on its next pass" if n
              else "nothing parked matched: see `academyd outbox list`")
    return EXIT_OK if n or args.all else fail(f"row {args.id} is not parked", 1)
