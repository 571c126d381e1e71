"""Read what Venom already has (data/memory/lessons.json, state_dump.json) as contract events.

Event ids derive from Venom's own ids, so importing twice adds nothing: the server's duplicate window
drops a quick re-run, and the daemon's inbox drops a later one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.models import LessonCreated, TaskCompleted

FINISHED = {"COMPLETED", "FAILED", "SUCCESS", "SUCCEEDED", "DONE", "ERROR", "CANCELLED"}


class ImportError_(Exception):
    """Venom's files are missing or unreadable; the message says which and what was expected."""


def memory_dir(root: Path) -> Path:
    """Accept Venom's checkout, its data/, or data/memory/ itself."""
    for candidate in (root / "data" / "memory", root / "memory", root):
        if (candidate / "lessons.json").is_file() or (candidate / "state_dump.json").is_file():
            return candidate
    raise ImportError_(
        f"no lessons.json or state_dump.json under {root} (looked in data/memory/, memory/ and the folder "
        "itself); pass Venom's directory"
    )


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ImportError_(f"{path} is not valid JSON ({exc}); fix or move it and run again") from None


def lessons(mem: Path) -> Iterator[LessonCreated]:
    path = mem / "lessons.json"
    if not path.is_file():
        return
    doc = _load(path)
    items = doc.get("lessons", []) if isinstance(doc, dict) else doc
    if isinstance(items, dict):  # some Venom versions keep {lesson_id: lesson}
        items = [{"lesson_id": k, **v} for k, v in items.items()]
    for raw in items:
        lesson_id = str(raw.get("lesson_id") or raw.get("id"))
        yield LessonCreated(
            schema_version=1,
            event_id=f"venom-lesson-{lesson_id}",
            lesson_id=lesson_id,
            timestamp=raw.get("timestamp") or datetime.now(UTC).isoformat(),
            situation=str(raw.get("situation", "")),
            action=str(raw.get("action", "")),
            result=str(raw.get("result", "")),
            feedback=raw.get("feedback"),
            tags=[str(t) for t in raw.get("tags", []) or []],
            metadata=raw.get("metadata") or {},
        )


def tasks(mem: Path) -> Iterator[TaskCompleted]:
    path = mem / "state_dump.json"
    if not path.is_file():
        return
    doc = _load(path)
    items = doc.get("tasks", []) if isinstance(doc, dict) else doc
    if isinstance(items, dict):
        items = [{"id": k, **v} for k, v in items.items()]
    for raw in items:
        status = str(raw.get("status", "")).upper().split(".")[-1]  # "TaskStatus.COMPLETED" -> COMPLETED
        if status not in FINISHED:
            continue  # still pending or running: it will arrive as task.completed when it ends
        task_id = str(raw.get("id") or raw.get("task_id"))
        yield TaskCompleted(
            schema_version=1,
            event_id=f"venom-task-{task_id}",
            task_id=task_id,
            content=str(raw.get("content", "")),
            result=None if raw.get("result") is None else str(raw.get("result")),
            status=status,
            logs=[str(x) for x in raw.get("logs", []) or []],
            context_history=raw.get("context_history"),
            model_version=raw.get("model_version"),
        )
