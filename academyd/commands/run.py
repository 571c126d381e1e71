"""`academyd run`: the daemon."""

from __future__ import annotations

import argparse
import asyncio

from academyd.commands.common import EXIT_FAILED, add_settings_args, fail, guard, settings_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "run",
        help="run the daemon (embedded NATS server unless --nats-url is given)",
        description="Run the Academy daemon: ingest lesson.created, commit.pushed and task.completed, "
        "decide when to train, curate, train, evaluate and promote. Without --nats-url it starts the "
        "bundled nats-server on 127.0.0.1 (JetStream, sync always) with its store under the data directory. "
        "SIGTERM/SIGINT stop it cleanly; under systemd it speaks sd_notify (READY, WATCHDOG, STOPPING).",
    )
    add_settings_args(p)
    p.add_argument("--port", type=int, help="embedded server port (0 = any free port; default 4222)")
    p.add_argument("--once", action="store_true", help="ingest what is pending, evaluate, publish, exit")
    p.set_defaults(func=guard(_run))


def _run(args: argparse.Namespace) -> int:
    from academyd import logs
    from academyd.app import App
    from academyd.basemodel import BaseModelError
    from academyd.bus import BusError
    from academyd.dashboard.server import PageUnavailable
    from academyd.embedded import EmbeddedServerError

    settings = settings_from(args)
    if args.port is not None:
        settings.nats.embedded_port = args.port
    logs.configure(settings.log_level, settings.log_format)
    app = App(settings)
    try:
        asyncio.run(app.run_once() if args.once else app.run())
    except (BusError, EmbeddedServerError, PageUnavailable, BaseModelError) as exc:
        return fail(str(exc), EXIT_FAILED)
    return 0
