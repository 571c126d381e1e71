"""Read what Venom already has (data/memory/lessons.json, state_dump.json, data/feedback/feedback.jsonl,
data/learning/hidden_prompts.jsonl) as contract events. `academyd import-venom` publishes them once;
`academyd bridge-venom` (academyd.bridge) follows the same files with the same code and the same ids.

Event ids derive from Venom's own ids (a task's id and status; a JSONL line's content), so importing twice
adds nothing: the server's duplicate window drops a quick re-run, and the daemon's inbox drops a later one.

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
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_incrementing

from academyd.events import describe
from schemas.models import FeedbackGiven, LessonCreated, PromptApproved, TaskCompleted

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


def feedback_file(mem: Path) -> Path:
    return mem.parent / "feedback" / "feedback.jsonl"


def approved_file(mem: Path) -> Path:
    return mem.parent / "learning" / "hidden_prompts.jsonl"


def memory_dir(root: Path) -> Path:
    """Accept Venom's checkout, its data/, or data/memory/ itself."""
    for candidate in (root / "data" / "memory", root / "memory", root):
        if (candidate / "lessons.json").is_file() or (candidate / "state_dump.json").is_file():
            return candidate
    raise ImportError_(
        f"no lessons.json or state_dump.json under {root} (looked in data/memory/, memory/ and the folder "
        "itself); pass Venom's directory"
    )


class _HalfWritten(Exception):
    """The file does not parse yet (empty, cut in a character or in the JSON): read it again."""


def load_json(path: Path, tries: int = READ_TRIES, pause_s: float = READ_PAUSE_S,
              sleep: Callable[[float], None] = time.sleep) -> Any:
    """Parse `path`, reading it again while it does not parse (Venom may be in the middle of writing it):
    `tries` reads at most, `pause_s` more between each (tenacity)."""

    def read() -> Any:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:  # cut in the middle of a multi-byte character
            raise _HalfWritten(exc) from None
        except OSError as exc:
            raise ImportError_(f"cannot read {path}: {exc}") from None
        if not text.strip():
            raise _HalfWritten("the file is empty")
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError, ValueError) as exc:
            raise _HalfWritten(exc) from None

    retrying = Retrying(retry=retry_if_exception_type(_HalfWritten), stop=stop_after_attempt(tries),
                        wait=wait_incrementing(start=pause_s, increment=pause_s), sleep=sleep, reraise=True)
    try:
        return retrying(read)
    except _HalfWritten as exc:
        raise ImportError_(
            f"{path} is not valid JSON after {tries} reads ({exc}); if Venom is not writing it right now, "
            "fix or move it and run again"
        ) from None


def _records(doc: Any, key: str, id_field: str) -> list[Any]:
    items = doc.get(key, []) if isinstance(doc, dict) else doc
    if isinstance(items, dict):  # some Venom versions keep {id: record}
        items = [{id_field: k, **v} if isinstance(v, dict) else v for k, v in items.items()]
    if not isinstance(items, list):
        raise ImportError_(f"expected a list of {key} (or {{\"{key}\": [...]}}), got {type(items).__name__}")
    return items


def _why(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return describe(exc, most=3)
    return f"{type(exc).__name__}: {exc}"[:300]


def _local(value: Any) -> datetime:
    """Venom stamps lessons with naive local time (`datetime.now().isoformat()`): this host's zone."""
    if not value:
        return datetime.now(UTC)
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be an ISO 8601 string, got {type(value).__name__}")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt.astimezone() if dt.tzinfo is None else dt


def lesson_event(raw: Any, event_id: str | None = None) -> LessonCreated:
    """One lesson of lessons.json as `lesson.created` (ValueError, KeyError, TypeError, ValidationError)."""
    if not isinstance(raw, dict):
        raise ValueError(f"a lesson is a JSON object, got {type(raw).__name__}")
    rid = raw.get("lesson_id") or raw.get("id")
    if not rid:
        raise ValueError("no lesson_id")
    lesson_id = str(rid)
    return LessonCreated(
        schema_version=1,
        event_id=event_id or f"venom-lesson-{lesson_id}",
        lesson_id=lesson_id,
        timestamp=_local(raw.get("timestamp")),
        situation=raw["situation"],
        action=raw["action"],
        result=raw["result"],
        feedback=raw.get("feedback"),
        tags=raw.get("tags") or [],
        metadata=raw.get("metadata") or {},
    )


def record_id(raw: Any, *keys: str) -> str | None:
    if not isinstance(raw, dict):
        return None
    rid = next((raw.get(k) for k in keys if raw.get(k)), None)
    return None if rid is None else str(rid)[:100]


def bad(file: str, index: int, raw: Any, exc: Exception, *keys: str) -> Bad:
    reason = f"missing {exc}" if isinstance(exc, KeyError) else _why(exc)
    return Bad(file, index, record_id(raw, *keys), reason)


RECORD_ERRORS = (ValidationError, ValueError, KeyError, TypeError)


def lessons(mem: Path) -> Iterator[LessonCreated | Bad]:
    path = mem / "lessons.json"
    if not path.is_file():
        return
    for index, raw in enumerate(_records(load_json(path), "lessons", "lesson_id")):
        try:
            yield lesson_event(raw)
        except RECORD_ERRORS as exc:
            yield bad("lessons.json", index, raw, exc, "lesson_id", "id")


def task_status(raw: dict[str, Any]) -> str:
    return str(raw.get("status", "")).upper().split(".")[-1]  # "TaskStatus.COMPLETED" -> COMPLETED


def task_event_id(task_id: str, status: str) -> str:
    """One event per (task, status): a finished task keeps the id import-venom always gave it."""
    return f"venom-task-{task_id}" if status in FINISHED else f"venom-task-{task_id}-{status.lower() or 'new'}"


def task_event(raw: Any) -> TaskCompleted:
    """One task of state_dump.json as `task.completed`, at the status it has now."""
    if not isinstance(raw, dict):
        raise ValueError(f"a task is a JSON object, got {type(raw).__name__}")
    rid = raw.get("id") or raw.get("task_id")
    if not rid:
        raise ValueError("no id")
    task_id = str(rid)
    status = task_status(raw)
    return TaskCompleted(
        schema_version=1,
        event_id=task_event_id(task_id, status),
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


def tasks(mem: Path) -> Iterator[TaskCompleted | Bad | Skipped]:
    """Finished tasks (import-venom: an unfinished one arrives when it ends, or through the bridge)."""
    path = mem / "state_dump.json"
    if not path.is_file():
        return
    for index, raw in enumerate(_records(load_json(path), "tasks", "id")):
        if isinstance(raw, dict) and (raw.get("id") or raw.get("task_id")) and task_status(raw) not in FINISHED:
            yield Skipped(str(raw.get("id") or raw.get("task_id")), task_status(raw))
            continue
        try:
            yield task_event(raw)
        except RECORD_ERRORS as exc:
            yield bad("state_dump.json", index, raw, exc, "id", "task_id")


def _line_hash(line: bytes) -> str:
    import hashlib

    return hashlib.sha256(line.strip()).hexdigest()[:24]


def feedback_event(line: bytes) -> FeedbackGiven:
    """One line of feedback.jsonl as `feedback.given`; its id is its content's (a line is written once)."""
    raw = json.loads(line)
    if not isinstance(raw, dict):
        raise ValueError(f"a feedback line is a JSON object, got {type(raw).__name__}")
    known = {k: raw.get(k) for k in ("task_id", "rating", "comment", "prompt", "result", "intent", "tool_required")}
    return FeedbackGiven(schema_version=1, event_id=f"venom-feedback-{_line_hash(line)}",
                         timestamp=_utc(raw.get("timestamp")), **known)


def approved_event(line: bytes) -> PromptApproved:
    """One line of hidden_prompts.jsonl as `prompt.approved`."""
    raw = json.loads(line)
    if not isinstance(raw, dict):
        raise ValueError(f"a hidden prompt is a JSON object, got {type(raw).__name__}")
    known = {k: raw.get(k) for k in ("task_id", "intent", "prompt", "approved_response", "prompt_hash", "note")}
    return PromptApproved(schema_version=1, event_id=f"venom-approved-{_line_hash(line)}",
                          timestamp=_utc(raw.get("timestamp")), **known)


def _utc(value: Any) -> datetime | None:
    """Venom's feedback timestamps: ISO, naive means UTC."""
    if not value or not isinstance(value, str):
        return None
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def jsonl(path: Path, parse: Callable[[bytes], Any], start: int = 0) -> tuple[list[Any], int]:
    """The complete lines of an appended JSONL file from byte `start`: (events or Bad, the offset after
    the last complete line). A last line without its newline is being written: it is left for later."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], start
    end = data.rfind(b"\n") + 1
    out: list[Any] = []
    for index, line in enumerate(data[:end].split(b"\n")):
        if not line.strip():
            continue
        try:
            out.append(parse(line))
        except (*RECORD_ERRORS, json.JSONDecodeError, UnicodeDecodeError) as exc:
            out.append(Bad(path.name, index, None, _why(exc)))
    return out, start + end
