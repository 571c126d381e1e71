"""The watch's assessment of one promotion (pure): hard guardrails first, then the anytime-valid test.

Input: the champion's outcomes since its promotion and its parent's record (the store's `served_outcomes`,
in the order the tasks finished) and the watch settings. Output: `rolled_back` (cause `failed_run`,
`template_leak` or `worse`), `confirmed` (cause `no_worse`) or `watching`, with what the page draws: the
champion's running rate and confidence sequence, the parent's rate and the lines it is measured against.

Guardrails act at once, without statistics: `guard_failed_run` failed or empty answers in a row (a broken
adapter answers nothing), or `guard_leaks` answers that hold a chat-template token (`<|im_start|>`,
`### Response:`, ...: the model writes the template instead of answering).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from academyd.anytime import confidence_path, judge
from academyd.settings import WatchSettings

SERIES_POINTS = 60


@dataclass(frozen=True)
class Assessment:
    state: str          # rolled_back | confirmed | watching
    cause: str          # failed_run | template_leak | worse | no_worse | "" (watching)
    at_task: int
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)


def guardrails(champion: list[dict[str, Any]], w: WatchSettings) -> tuple[str, int, str] | None:
    """(cause, at_task, reason) of the first guardrail the champion's tasks trip, or None."""
    run = leaks = 0
    for i, t in enumerate(champion, start=1):
        leaks += bool(t["leak"])
        if leaks >= w.guard_leaks:
            return ("template_leak", i, f"answer {i} ({t['task_id']}) holds a chat-template token "
                    f"({leaks} such answers): the model writes the template instead of answering")
        run = run + 1 if (t["failed"] or t["empty"]) else 0
        if run >= w.guard_failed_run:
            return ("failed_run", i, f"{run} failed or empty answers in a row (tasks {i - run + 1}-{i})")
    return None


def series(outcomes: list[bool], lo: Any, hi: Any, points: int = SERIES_POINTS) -> list[dict[str, float]]:
    """The champion's running rate and confidence sequence (`lo`, `hi`: its path) at up to `points` tasks."""
    n = len(outcomes)
    if not n:
        return []
    idx = sorted({max(1, round(n * k / points)) for k in range(1, points + 1)} | {1, n})
    running = 0
    out = []
    cum = [0]
    for o in outcomes:
        running += o
        cum.append(running)
    for t in idx:
        out.append({"task": t, "rate": cum[t] / t, "lower": float(lo[t - 1]), "upper": float(hi[t - 1])})
    return out


def assess(champion: str, parent: str, champion_tasks: list[dict[str, Any]], parent_tasks: list[dict[str, Any]],
           w: WatchSettings) -> Assessment:
    outcomes = [bool(t["ok"]) for t in champion_tasks]
    p_ok = sum(bool(t["ok"]) for t in parent_tasks)
    lo, hi = confidence_path(outcomes, w.alpha) if outcomes else ([], [])
    j = judge(outcomes, p_ok, len(parent_tasks), alpha=w.alpha, rollback_margin=w.rollback_margin,
              confirm_margin=w.confirm_margin, cs=(float(lo[-1]), float(hi[-1])) if outcomes else (0.0, 1.0))
    stats = {**j.stats, "champion": champion, "parent": parent,
             "thumbs": sum(1 for t in champion_tasks if t.get("thumb")),
             "series": series(outcomes, lo, hi)}
    tripped = guardrails(champion_tasks, w)
    if tripped is not None and (j.state == "watching" or tripped[1] <= j.at_task or j.state == "confirmed"):
        cause, at, why = tripped
        return Assessment("rolled_back", cause, at, f"guardrail: {why}", stats)
    if j.state == "rolled_back":
        return Assessment("rolled_back", "worse", j.at_task, f"{champion} {j.reason} ({parent})", stats)
    if j.state == "confirmed":
        return Assessment("confirmed", "no_worse", j.at_task, f"{champion} {j.reason} ({parent})", stats)
    return Assessment("watching", "", 0, f"{champion} vs {parent}: {j.reason}", stats)
