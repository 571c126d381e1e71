"""`academyd train`: ask for a training run now, and optionally follow it live."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from academyd.commands.common import (
    EXIT_FAILED,
    add_json_arg,
    add_settings_args,
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
        "second concurrent run. --follow shows the run live (loss, step, ETA) until it ends. "
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
    reply = request(settings, "academy.cmd.train", {"force": args.force, "reason": args.reason})
    if not args.follow or not reply.get("started"):
        if args.json:
            print_json(reply)
        else:
            print(("started " + str(reply.get("run_id")) if reply.get("started") else "not started")
                  + f": {reply.get('reason')}")
        return 0 if reply.get("started") else EXIT_FAILED
    if not args.json:
        print(f"started {reply['run_id']}: {reply.get('reason')}")
    final = asyncio.run(follow(settings, reply["run_id"], as_json=args.json))
    return 0 if final.get("subject") == "academy.training.finished" else EXIT_FAILED


async def follow(settings: Settings, run_id: str, as_json: bool = False) -> dict[str, Any]:
    """Show academy.training.* events of one run until it finishes or fails."""
    import nats
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from academyd.bus import connect_options

    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    nc = await nats.connect(**connect_options(settings.nats, daemon_url(settings)))
    progress = None if as_json else Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
    )
    task_id = progress.add_task(run_id, total=None, loss="-") if progress else None

    async def on_msg(msg: Any) -> None:
        try:
            ev = json.loads(msg.data)
        except ValueError:
            return
        if ev.get("run_id") != run_id:
            return
        if as_json:
            print(json.dumps({"subject": msg.subject, **ev}, default=str), flush=True)
        elif msg.subject == "academy.training.progress" and progress is not None:
            loss = ev.get("loss")
            progress.update(task_id, completed=ev.get("step") or 0, total=ev.get("total_steps"),
                            loss=f"{loss:.4f}" if isinstance(loss, float) else "-")
        elif progress is not None:
            progress.console.print(f"{msg.subject}: " + ", ".join(
                f"{k}={v}" for k, v in ev.items() if k in ("reason", "version", "final_loss", "verdict", "habitat")))
        if msg.subject in ("academy.training.finished", "academy.training.failed") and not done.done():
            done.set_result({"subject": msg.subject, **ev})

    sub = await nc.subscribe("academy.training.>", cb=on_msg)
    try:
        if progress is not None:
            with progress:
                return await done
        return await done
    finally:
        await sub.unsubscribe()
        await nc.close()
