"""`academyd import-venom DIR`: publish Venom's existing lessons and tasks as events."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from academyd.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_json_arg,
    add_settings_args,
    daemon_url,
    fail,
    guard,
    print_json,
    settings_from,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "import-venom",
        help="publish Venom's lessons, tasks, thumbs and approved answers as events (once)",
        description="Read Venom's data/memory/lessons.json and state_dump.json, data/feedback/feedback.jsonl and "
        "data/learning/hidden_prompts.jsonl and publish them as lesson.created, task.completed, feedback.given "
        "and prompt.approved events, so they take the same path as live events (`bridge-venom` follows the "
        "same files continuously). Event ids "
        "come from Venom's ids: running it twice adds nothing. Finished tasks only. A record that does not fit "
        "is reported and the rest are imported (exit code 1 when there were any).",
    )
    p.add_argument("dir", type=Path, help="Venom's directory (or its data/memory folder)")
    add_settings_args(p)
    add_json_arg(p)
    p.set_defaults(func=guard(_import))


def _import(args: argparse.Namespace) -> int:
    from academyd.venom_import import (
        Bad,
        ImportError_,
        Skipped,
        approved_event,
        approved_file,
        feedback_event,
        feedback_file,
        jsonl,
        lessons,
        memory_dir,
        tasks,
    )

    bad: list[Bad] = []
    skipped = 0
    events: list[tuple[str, Any]] = []
    try:
        mem = memory_dir(args.dir)
        appended = (("feedback.given", jsonl(feedback_file(mem), feedback_event)[0]),
                    ("prompt.approved", jsonl(approved_file(mem), approved_event)[0]))
        for subject, source in (("lesson.created", lessons(mem)), ("task.completed", tasks(mem)), *appended):
            for item in source:
                if isinstance(item, Bad):
                    bad.append(item)
                elif isinstance(item, Skipped):
                    skipped += 1
                else:
                    events.append((subject, item))
    except ImportError_ as exc:
        return fail(str(exc), EXIT_USAGE)
    settings = settings_from(args)
    counts = asyncio.run(_publish(settings, events))
    report = {"source": str(mem), **counts, "unfinished_tasks": skipped, "bad": len(bad),
              "bad_records": [str(b) for b in bad[:10]]}
    if args.json:
        print_json({"ok": not bad, **report})
    else:
        print(f"published {counts['published']} events from {mem} "
              f"({counts['lessons']} lessons, {counts['tasks']} tasks, {counts['feedback']} thumbs, "
              f"{counts['approved']} approved answers; {counts['duplicates']} already on the bus"
              + (f"; {skipped} unfinished tasks left for task.completed" if skipped else "") + ")")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        return fail(f"{len(bad)} record(s) do not fit the contract and were not imported; the rest were: "
                    + "; ".join(str(b) for b in bad[:5]) + more, EXIT_FAILED)
    return EXIT_OK


async def _publish(settings: Any, events: list[tuple[str, Any]]) -> dict[str, int]:
    import nats

    from academyd.commands.common import DaemonUnreachable

    from academyd.commands.common import cli_connect_options

    try:
        nc = await nats.connect(**cli_connect_options(settings))
    except DaemonUnreachable:
        raise
    except Exception as exc:
        raise DaemonUnreachable(f"cannot reach NATS at {daemon_url(settings)}: {exc}") from None
    js = nc.jetstream(timeout=10)
    out = {"published": 0, "duplicates": 0, "lessons": 0, "tasks": 0, "feedback": 0, "approved": 0}
    kinds = {"lesson.created": "lessons", "task.completed": "tasks", "feedback.given": "feedback",
             "prompt.approved": "approved"}
    try:
        for subject, ev in events:
            ack = await js.publish(subject, ev.model_dump_json().encode(), headers={"Nats-Msg-Id": ev.event_id})
            out["duplicates" if ack.duplicate else "published"] += 1
            out[kinds[subject]] += 1
    finally:
        await nc.close()
    return out
