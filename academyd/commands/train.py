"""`academyd train`: ask for a training run now, and optionally follow it live."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from academyd.commands.common import (
    EXIT_FAILED,
    DaemonUnreachable,
    add_json_arg,
    add_settings_args,
    client_nats,
    daemon_url,
    guard,
    print_json,
    request,
    settings_from,
)
from academyd.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "train",
        help="ask the daemon to train now (if the policy allows, or --force)",
        description="Send academy.cmd.train. Without --force the policy decides (new successful lessons, "
        "interval since the last training, quiet hours); --force skips the thresholds but never starts a "
        "second concurrent run. --follow shows the run live (step, loss, tokens/s, ETA) until it ends, read from the "
        "outbound stream so even a very fast run is seen whole; with --json it prints JSON lines (the reply, then "
        "each academy.training.* event of the run). "
        "Exit codes: 0 a run started (and, with --follow, finished), 1 refused or failed, 3 no daemon.",
    )
    add_settings_args(p)
    p.add_argument("--force", action="store_true", help="skip the thresholds")
    p.add_argument("--reason", default="manual", help="why (kept with the run)")
    p.add_argument("--follow", action="store_true", help="follow the run until it finishes")
    add_json_arg(p)
    p.set_defaults(func=guard(_train))


def _train(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    body = {"force": args.force, "reason": args.reason}
    if not args.follow:
        reply = request(settings, "academy.cmd.train", body)
        if args.json:
            print_json(reply)
        else:
            print(("started " + str(reply.get("run_id")) if reply.get("started") else "not started")
                  + f": {reply.get('reason')}")
        return 0 if reply.get("started") else EXIT_FAILED
    return asyncio.run(_train_and_follow(settings, body, as_json=args.json))


async def _train_and_follow(settings: Settings, body: dict[str, Any], as_json: bool) -> int:
    """Note where the outbound stream stands, ask for the run, then read the run's events from there:
    an ordered consumer from that sequence cannot miss a run that ends before we subscribe."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from academyd.commands.common import _request

    start_seq = await _outbound_last_seq(settings)
    try:
        reply = await _request(settings, "academy.cmd.train", body, timeout=10.0)
    except (NoRespondersError, NatsTimeout) as exc:
        raise DaemonUnreachable(
            f"no academyd answered on {daemon_url(settings)} ({type(exc).__name__}). Start it with "
            "`academyd run`, or pass --nats-url / ACADEMY_NATS__URL."
        ) from None
    if as_json:  # JSON lines: the reply, then every event of the run
        print(json.dumps(reply, default=str), flush=True)
    if not reply.get("started"):
        if not as_json:
            print(f"not started: {reply.get('reason')}")
        return EXIT_FAILED
    if not as_json:
        print(f"started {reply['run_id']}: {reply.get('reason')}")
    final = await follow(settings, reply["run_id"], as_json=as_json,
                         start_seq=None if start_seq is None else start_seq + 1)
    if not as_json:
        if final.get("subject") == "academy.training.finished":
            print(f"finished {final.get('run_id')}: version {final.get('version') or '-'}, "
                  f"final loss {_fmt(final.get('final_loss'))}, {_fmt(final.get('duration_s'))} s")
        else:
            print(f"failed {final.get('run_id')}: {final.get('reason')}")
    return 0 if final.get("subject") == "academy.training.finished" else EXIT_FAILED


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "-")


async def _outbound_last_seq(settings: Settings) -> int | None:
    """The last sequence of the outbound stream (None: no such stream; follow live events only)."""
    import nats
    from nats.js.errors import NotFoundError

    from academyd.commands.common import cli_connect_options

    try:
        nc = await nats.connect(**cli_connect_options(settings))
    except DaemonUnreachable:
        raise
    except Exception as exc:
        raise DaemonUnreachable(
            f"cannot reach NATS at {daemon_url(settings)} ({type(exc).__name__}: {exc}). Start the daemon with "
            "`academyd run`, or pass --nats-url / ACADEMY_NATS__URL."
        ) from None
    try:
        info = await nc.jetstream(timeout=5).stream_info(settings.nats.outbound_stream)
        return int(info.state.last_seq)
    except NotFoundError:
        return None
    finally:
        await nc.close()


async def follow(settings: Settings, run_id: str, as_json: bool = False,
                 start_seq: int | None = None) -> dict[str, Any]:
    """Show academy.training.* events of one run until it finishes or fails.

    With `start_seq`, read the outbound stream (ordered consumer) from that sequence, so nothing published
    since is missed; without it, listen to live events only.
    """
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from academyd.bus import connect_options

    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    nc = await nats.connect(**connect_options(client_nats(settings), daemon_url(settings)))
    progress = None if as_json else Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]}"), TimeRemainingColumn(),
    )
    task_id = progress.add_task(run_id, total=None, loss="-", tps="") if progress else None

    async def on_msg(msg: Any) -> None:
        try:
            ev = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(ev, dict) or ev.get("run_id") != run_id:
            return
        if as_json:
            print(json.dumps({"subject": msg.subject, **ev}, default=str), flush=True)
        elif msg.subject == "academy.training.progress" and progress is not None:
            loss, tps = ev.get("loss"), ev.get("tokens_per_s")
            progress.update(task_id, completed=ev.get("step") or 0, total=ev.get("total_steps"),
                            loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                            tps=f"{tps:,.0f} tok/s" if isinstance(tps, (int, float)) else "")
        elif progress is not None:
            progress.console.print(f"{msg.subject}: " + ", ".join(
                f"{k}={v}" for k, v in ev.items() if k in ("reason", "version", "final_loss", "verdict", "habitat")))
        if msg.subject in ("academy.training.finished", "academy.training.failed") and not done.done():
            done.set_result({"subject": msg.subject, **ev})

    if start_seq is not None:
        sub = await nc.jetstream().subscribe(
            "academy.training.>", cb=on_msg, stream=settings.nats.outbound_stream, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq),
        )
    else:
        sub = await nc.subscribe("academy.training.>", cb=on_msg)
    try:
        if progress is not None:
            with progress:
                return await done
        return await done
    finally:
        await sub.unsubscribe()
        await nc.close()
