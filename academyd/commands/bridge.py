"""`academyd bridge-venom DIR`: follow a running Venom's data directory and publish what is new (#20)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from academyd.commands.common import (
    EXIT_OK,
    EXIT_USAGE,
    DaemonUnreachable,
    add_settings_args,
    daemon_url,
    fail,
    guard,
    settings_from,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bridge-venom",
        help="follow Venom's data directory and publish new lessons, tasks, thumbs and approved answers",
        description="Follow a running Venom's files (data/memory/lessons.json and state_dump.json, rewritten in "
        "place; data/feedback/feedback.jsonl and data/learning/hidden_prompts.jsonl, appended) and publish what "
        "is new or changed as lesson.created, task.completed (each status: PENDING, PROCESSING, then finished), "
        "feedback.given and prompt.approved events, as the `agent` identity. Stable event ids and a cursor "
        "file make restarts add nothing; a file caught half-written is read again at the next poll. Runs until "
        "SIGTERM/SIGINT. `import-venom` is the one-shot form.",
    )
    p.add_argument("dir", type=Path, help="Venom's directory (or its data/ or data/memory folder)")
    p.add_argument("--once", action="store_true", help="poll once, publish, and exit")
    p.add_argument("--cursor", type=Path, help="the cursor file (default <data-dir>/bridge/venom-<hash>.json)")
    add_settings_args(p)
    p.set_defaults(func=guard(_bridge))


def agent_connect_options(settings: Any) -> dict[str, Any]:
    """As configured (ACADEMY_NATS__URL/USER/PASSWORD...), or the embedded server's generated `agent`."""
    from academyd.bus import connect_options
    from academyd.nats_auth import AGENT, as_identity, password_file, read_password

    cfg = settings.nats
    if not (cfg.user or cfg.token or cfg.creds_file):
        password = read_password(settings.nats_dir, AGENT)
        if password is None and not cfg.url:
            raise DaemonUnreachable(
                f"no credentials for the embedded NATS server ({password_file(settings.nats_dir, AGENT)} is "
                "missing): start the daemon in this data directory first, pass its --data-dir, or give "
                "ACADEMY_NATS__URL, ACADEMY_NATS__USER and ACADEMY_NATS__PASSWORD of Venom's agents")
        if password is not None:
            cfg = as_identity(cfg, AGENT, password)
    opts = connect_options(cfg, daemon_url(settings))
    opts["name"] = "academyd-bridge"
    return opts


def _bridge(args: argparse.Namespace) -> int:
    from academyd.venom_import import ImportError_, memory_dir

    try:
        mem = memory_dir(args.dir)
    except ImportError_ as exc:
        return fail(str(exc), EXIT_USAGE)
    settings = settings_from(args)
    from academyd import logs

    logs.configure(settings.log_level, settings.log_format)
    asyncio.run(_run(settings, mem, args))
    return EXIT_OK


async def _run(settings: Any, mem: Path, args: argparse.Namespace) -> None:
    import nats
    import structlog

    from academyd.bridge import Bridge, default_cursor, jetstream_publisher

    log = structlog.get_logger("academyd.bridge")
    try:
        nc = await nats.connect(**agent_connect_options(settings))
    except DaemonUnreachable:
        raise
    except Exception as exc:
        raise DaemonUnreachable(f"cannot reach NATS at {daemon_url(settings)}: {exc}") from None
    b = settings.bridge
    cursor = args.cursor or b.cursor or default_cursor(settings.data_dir, mem)
    bridge = Bridge(mem, await jetstream_publisher(nc), cursor, poll_s=b.poll_s, max_per_s=b.max_per_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("bridge_started", venom=str(mem), cursor=str(cursor), poll_s=b.poll_s, max_per_s=b.max_per_s)
    try:
        if args.once:
            await bridge.poll()
        else:
            await bridge.run(stop)
    finally:
        s = bridge.stats
        log.info("bridge_stopped", published=s.published, duplicates=s.duplicates, bad=s.bad,
                 half_read=s.half_read, polls=s.polls)
        await nc.close()
