"""CLI subcommands: one module each, with `register(subparsers)`; see academyd.cli."""
