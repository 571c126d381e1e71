"""`academyd`: one command line for the daemon and its operators.

Each subcommand lives in `academyd.commands.<name>` and exposes `register(subparsers)`, which adds its
parser and sets `func(args) -> int` (the exit code; see `academyd.commands.common.EXIT_*`: 0 ok,
1 refused or failed, 2 bad input or settings, 3 the daemon could not be reached).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from academyd import __version__

COMMAND_MODULES = [
    "academyd.commands.run",
    "academyd.commands.status",
    "academyd.commands.train",
    "academyd.commands.dataset",
    "academyd.commands.outbox",
    "academyd.commands.models",
    "academyd.commands.import_venom",
    "academyd.commands.bridge",
    "academyd.commands.schemas",
    "academyd.commands.worker",
    "academyd.commands.follow",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="academyd",
        description="The Academy: Venom's learning loop. Hears lessons on NATS, curates datasets, fine-tunes "
        "with LoRA, proves the adapter on held-out data and promotes it.",
    )
    parser.add_argument("--version", action="version", version=f"academyd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
