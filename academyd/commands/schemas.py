"""`academyd schemas export`: the JSON Schema files of the wire contract."""

from __future__ import annotations

import argparse
from pathlib import Path

from academyd.commands.common import add_json_arg, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("schemas", help="the wire contract as JSON Schema files")
    inner = p.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)
    e = inner.add_parser(
        "export",
        help="write one JSON Schema per subject",
        description="Write one JSON Schema file per subject (inbound events, commands, outbound events) "
        "generated from the pydantic models. Default target: the installed `schemas/` package directory.",
    )
    e.add_argument("--out", type=Path, help="target directory (default: the schemas package)")
    add_json_arg(e)
    e.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    import schemas

    written = schemas.export(args.out) if args.out else schemas.export()
    if args.json:
        print_json({"ok": True, "files": [str(p) for p in written]})
    else:
        for path in written:
            print(path)
    return 0
