"""Read what Venom already has (data/memory/lessons.json, state_dump.json) as contract events.

Event ids derive from Venom's own ids, so importing twice adds nothing: the server's duplicate window
drops a quick re-run, and the daemon's inbox drops a later one.

The shapes are Venom's own (mpieniak01/Venom at b5050aaa): `LessonsStore.save_lessons` writes
`{"lessons": [Lesson.to_dict()], "count", "last_updated"}` with a plain `open(path, "w")`, so a reader can
catch it half-written (it is read again until it parses); `StateManager._save` writes
`{"tasks": [VenomTask.model_dump(mode="json")], ...}`. One record that does not fit the contract is
reported (`Bad`) and the others are imported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.models import LessonCreated, TaskCompleted

FINISHED = {"COMPLETED", "FAILED", "SUCCESS", "SUCCEEDED", "DONE", "ERROR", "CANCELLED"}
# Venom rewrites lessons.json in place on every new lesson; a read in the middle sees a prefix of it.
READ_TRIES = 8
READ_PAUSE_S = 0.25


class ImportError_(Exception):
    """Venom's files are missing or unreadable; the message says which and what was expected."""


@dataclass(frozen=True)
class Bad:
    """A record that does not fit the contract: where it is and why."""

    file: str
    index: int
    record_id: str | None
    reason: str

    def __str__(self) -> str:
        who = f" ({self.record_id})" if self.record_id else ""
        return f"{self.file} record {self.index}{who}: {self.reason}"


@dataclass(frozen=True)
class Skipped:
    """A task that has not finished (PENDING, PROCESSING): it arrives as task.completed when it ends."""

    task_id: str
    status: str


def memory_dir(root: Path) -> Path:
    """Accept Venom's checkout, its data/, or data/memory/ itself."""
    for candidate in (root / "data" / "memory", root / "memory", root):
        if (candidate / "lessons.json").is_file() or (candidate / "state_dump.json").is_file():
            return candidate
    raise ImportError_(
        f"no lessons.json or state_dump.json under {root} (looked in data/memory/, memory/ and the folder "
        "itself); pass Venom's directory"
    )


def load_json(path: Path, tries: int = READ_TRIES, pause_s: float = READ_PAUSE_S,
              sleep: Callable[[float], None] = time.sleep) -> Any:
    """Parse `path`, reading it again while it does not parse (Venom may be in the middle of writing it)."""
    error: Exception | None = None
    for attempt in range(tries):
        if attempt:
            sleep(pause_s * attempt)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # cut in the middle of a multi-byte character
            error = exc
            continue
        except OSError as exc:
            raise ImportError_(f"cannot read {path}: {exc}") from None
        if not text.strip():
            error = ValueError("the file is empty")
            continue
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            error = exc
    raise ImportError_(
        f"{path} is not valid JSON after {tries} reads ({error}); if Venom is not writing it right now, "
        "fix or move it and run again"
    )


def _records(doc: Any, key: str, id_field: str) -> list[Any]:
    items = doc.get(key, []) if isinstance(doc, dict) else doc
    if isinstance(items, dict):  # some Venom versions keep {id: record}
        items = [{id_field: k, **v} if isinstance(v, dict) else v for k, v in items.items()]
    if not isinstance(items, list):
        raise ImportError_(f"expected a list of {key} (or {{\"{key}\": [...]}}), got {type(items).__name__}")
    return items


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()[:3])
    return f"{type(exc).__name__}: {exc}"[:300]


def _local(value: Any) -> datetime:
    """Venom stamps lessons with naive local time (`datetime.now().isoformat()`): this host's zone."""
    if not value:
        return datetime.now(UTC)
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be an ISO 8601 string, got {type(value).__name__}")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt.astimezone() if dt.tzinfo is None else dt


def lessons(mem: Path) -> Iterator[LessonCreated | Bad]:
    path = mem / "lessons.json"
    if not path.is_file():
        return
    for index, raw in enumerate(_records(load_json(path), "lessons", "lesson_id")):
        rid = None
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"a lesson is a JSON object, got {type(raw).__name__}")
            rid = raw.get("lesson_id") or raw.get("id")
            if not rid:
                raise ValueError("no lesson_id")
            lesson_id = str(rid)
            yield LessonCreated(
                schema_version=1,
                event_id=f"venom-lesson-{lesson_id}",
                lesson_id=lesson_id,
                timestamp=_local(raw.get("timestamp")),
                situation=raw["situation"],
                action=raw["action"],
                result=raw["result"],
                feedback=raw.get("feedback"),
                tags=raw.get("tags") or [],
                metadata=raw.get("metadata") or {},
            )
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            reason = f"missing {exc}" if isinstance(exc, KeyError) else _why(exc)
            yield Bad("lessons.json", index, None if rid is None else str(rid)[:100], reason)


def tasks(mem: Path) -> Iterator[TaskCompleted | Bad | Skipped]:
    path = mem / "state_dump.json"
    if not path.is_file():
        return
    for index, raw in enumerate(_records(load_json(path), "tasks", "id")):
        rid = None
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"a task is a JSON object, got {type(raw).__name__}")
            rid = raw.get("id") or raw.get("task_id")
            if not rid:
                raise ValueError("no id")
            task_id = str(rid)
            status = str(raw.get("status", "")).upper().split(".")[-1]  # "TaskStatus.COMPLETED" -> COMPLETED
            if status not in FINISHED:
                yield Skipped(task_id, status)
                continue
            yield TaskCompleted(
                schema_version=1,
                event_id=f"venom-task-{task_id}",
                task_id=task_id,
                content=raw["content"],
                result=raw.get("result"),
                status=status,
                created_at=raw.get("created_at"),
                logs=raw.get("logs") or [],
                context_history=raw.get("context_history"),
                context_used=raw.get("context_used"),
                model_version=raw.get("model_version"),
            )
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            reason = f"missing {exc}" if isinstance(exc, KeyError) else _why(exc)
            yield Bad("state_dump.json", index, None if rid is None else str(rid)[:100], reason)
