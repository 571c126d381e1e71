"""`academyd status`: what the daemon knows, as a table (or JSON)."""

from __future__ import annotations

import argparse
from typing import Any

from academyd.commands.common import add_json_arg, add_settings_args, guard, print_json, request, settings_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        help="ask the running daemon how things stand",
        description="Ask the running daemon (academy.status): events kept per subject, progress toward the "
        "next training, when it is next eligible, the active run, the champion, and the dead-letter count.",
    )
    add_settings_args(p)
    add_json_arg(p)
    p.set_defaults(func=guard(_status))


def _status(args: argparse.Namespace) -> int:
    reply = request(settings_from(args), "academy.status")
    if args.json:
        print_json(reply)
    else:
        render(reply)
    return 0


def _bar(done: float, total: float, width: int = 20) -> str:
    frac = max(0.0, min(1.0, done / total)) if total else 0.0
    full = round(frac * width)
    return "█" * full + "░" * (width - full) + f" {frac:4.0%}"


def _until(when: str | None, now: str | None) -> str:
    """'now' or 'in 3h 12m (2026-11-25 15:12 UTC)' from the daemon's own clock."""
    from datetime import datetime

    if not when or not now:
        return "now"
    delta = (datetime.fromisoformat(when) - datetime.fromisoformat(now)).total_seconds()
    if delta <= 0:
        return "now"
    h, rem = divmod(int(delta), 3600)
    left = f"{h}h {rem // 60}m" if h else f"{rem // 60}m {rem % 60}s"
    return f"in {left} ({datetime.fromisoformat(when):%Y-%m-%d %H:%M} UTC)"


def _served(s: dict[str, Any]) -> str:
    """What the follower last reported, beside the champion: the same, behind, or why not."""
    served = s.get("served")
    if not served:
        return "[yellow]not reported yet[/] (no model.deployed / model.deploy_failed seen since the daemon started)"
    version = served.get("serving")
    gen = f" (generation {served['generation']})" if served.get("generation") is not None else ""
    text = f"{version or 'base model'} on {served.get('target')}"
    if served.get("outcome") == "model.deploy_failed":
        code = f" {served['reason_code']}" if served.get("reason_code") else ""
        text += f"  [red]{served.get('version') or 'base model'}{gen} not deployed: {served.get('reason')}{code}[/]"
    else:
        text += f" {gen}"
    if version != s.get("champion") or (served.get("generation") or 0) < (s.get("champion_generation") or 0):
        return f"[yellow]{text}  (behind the champion)[/]"
    return f"[green]{text}[/]"


def render(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="The Academy", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    counts = s.get("counts", {})
    for subject in ("lesson.created", "commit.pushed", "task.completed"):
        t.add_row(subject, str(counts.get(subject, 0)))
    th = s.get("threshold", {})
    new, need = th.get("new_successful_lessons", 0), th.get("min_lessons", 0)
    t.add_row("new successful lessons", f"{new} / {need}  {_bar(new, need)}" + ("  (enough)" if need and new >= need else ""))
    t.add_row("last training ended", str(th.get("last_training_ended") or "never"))
    t.add_row("min interval", f"{th.get('min_interval_h')} h")
    if th.get("quiet_hours"):
        t.add_row("quiet hours", f"{th['quiet_hours']} UTC")
    t.add_row("next eligible", _until(s.get("next_eligible"), s.get("now")))
    d = s.get("decision", {})
    t.add_row("policy says", ("[green]train[/]: " if d.get("train") else "[yellow]wait[/]: ") + str(d.get("reason")))
    run = s.get("active_run")
    live = s.get("training") or {}
    if run and live.get("step") is not None:
        step, total = live.get("step") or 0, live.get("total_steps")
        loss = live.get("loss")
        t.add_row("active run", f"{run['run_id']} ({run['state']})")
        t.add_row("  progress", (f"step {step}/{total}  {_bar(step, total)}" if total else f"step {step}")
                  + (f"  loss {loss:.4f}" if isinstance(loss, (int, float)) else ""))
    else:
        t.add_row("active run", f"{run['run_id']} ({run['state']})" if run else "none")
    if run and s.get("waiting"):
        t.add_row("  [yellow]waiting[/]", str(s["waiting"]))
    last = s.get("last_run")
    if last and (not run or last["run_id"] != run["run_id"]):
        extra = f": {last['error']}" if last.get("error") else ""
        colour = "green" if last["state"] == "succeeded" else "red" if last["state"] in ("failed", "refused") else ""
        state = f"[{colour}]{last['state']}[/]" if colour else last["state"]
        t.add_row("last run", f"{last['run_id']} {state}{extra}")
    if "champion" in s:
        t.add_row("champion", str(s.get("champion") or "base model")
                  + (f"  (generation {s['champion_generation']})" if s.get("champion_generation") else ""))
        t.add_row("served", _served(s))
    lv = s.get("last_verdict")
    if isinstance(lv, dict):
        ev, ra = lv.get("evidence") or {}, lv.get("right_answers") or {}
        if lv.get("insufficient_evidence"):
            text = (f"[yellow]insufficient evidence[/]: {ev.get('heldout_families')} held-out families, "
                    f"{ev.get('needed')} needed; about {ev.get('lessons_needed')} more lessons that ask new questions")
        else:
            text = str(lv.get("verdict"))
            if ra:
                text += (f"  right answers {ra.get('candidate_right')}/{ra.get('questions')} vs "
                         f"{ra.get('champion_right')}/{ra.get('questions')} on {ra.get('families')} families "
                         f"(p={ra.get('p_value', 1.0):.3g})")
        t.add_row("last verdict", f"{lv.get('version')}: {text}")
    base = s.get("base_model")
    if isinstance(base, dict):
        t.add_row("base model", f"{base.get('name')} ({base.get('kind')}) {base.get('path')}")
        t.add_row("  sha256", str(base.get("sha256")))
    if s.get("last_dataset"):
        ds = s["last_dataset"]
        t.add_row("last dataset", f"{ds.get('dataset_id')} ({ds.get('examples')} examples, {ds.get('heldout')} held out)"
                  + (f", refused: {ds['refused']}" if ds.get("refused") else ""))
    dlq = s.get("dlq", {})
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(dlq.get("by_reason", {}).items()))
    t.add_row("dead-lettered", f"{dlq.get('count', 0)}" + (f" ({reasons})" if reasons else ""))
    health = s.get("health") or {}
    for component, problem in sorted((health.get("problems") or {}).items()):
        t.add_row(f"[red]{component}[/]", f"{problem.get('reason')} (since {problem.get('since')})")
    t.add_row("outbox pending", str(s.get("outbox_pending", 0)))
    for row in s.get("outbox_parked") or []:
        t.add_row("[red]outbox parked[/]", f"#{row['id']} {row['subject']} {row['msg_id']} after {row['attempts']} "
                  f"attempts: {row.get('last_error')}")
    t.add_row("nats", str(s.get("nats_url")))
    if s.get("page_url"):
        t.add_row("page", str(s["page_url"]))
    Console().print(t)
