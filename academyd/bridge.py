"""`academyd bridge-venom DIR`: follow a running Venom's data directory and publish what is new or changed.

Venom has no bus: its agents write files (shared/DESIGN.md, "Compatibility with Venom"):
- `data/memory/lessons.json` and `state_dump.json`, rewritten in place with `open(path, "w")` (a reader
  can catch them half-written);
- `data/feedback/feedback.jsonl` and `data/learning/hidden_prompts.jsonl`, appended a line at a time.

Every `bridge.poll_s` the bridge stats the four files (nothing else while Venom is idle). A rewritten JSON
file is read whole; one that does not parse is being written and is read again at the next poll, never
half-read (its stat is not recorded until it parses). An appended file is read from the cursor's offset to
its last newline: a line still being written waits. What is new or changed is published (JetStream, with
`Nats-Msg-Id` = the event id and the publish acked) at `bridge.max_per_s` at most, with the ids of
academyd.venom_import (`import-venom` is the one-shot form of the same code):

- a lesson: `venom-lesson-<id>` (a lesson whose content changed later: `-<content hash>` added);
- a task: one event per status it is seen in (`venom-task-<id>-pending`, `-processing`, then
  `venom-task-<id>` when finished); the daemon moves the stored task forward, never back;
- a thumb (`feedback.given`) and an approved answer (`prompt.approved`): the hash of their line.

The cursor (a JSON file, replaced atomically after the events it records were acked) holds each file's
stat and offset and what was published of each lesson and task. A bridge killed between a publish and its
cursor publishes those events again with the same ids: the server's duplicate window or the daemon's inbox
drops them, so every record is stored once across restarts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from academyd.files import atomic_write_json
from academyd.venom_import import (
    RECORD_ERRORS,
    Bad,
    _records,
    approved_event,
    approved_file,
    bad,
    feedback_event,
    feedback_file,
    jsonl,
    lesson_event,
    task_event,
    task_status,
)
from schemas.models import Event

log = structlog.get_logger("academyd.bridge")

Publish = Callable[[str, Event], Awaitable[bool]]  # (subject, event) -> True when new on the bus


def _digest(raw: Any) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


@dataclass
class Stats:
    published: int = 0
    duplicates: int = 0
    bad: int = 0
    half_read: int = 0  # reads of a JSON file caught in the middle of Venom's write (read again later)
    polls: int = 0
    by_subject: dict[str, int] = field(default_factory=dict)


class RateLimit:
    """At most `per_s` events a second (a token bucket of one second's worth)."""

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.clock = clock
        self.tokens = per_s
        self.at = clock()

    async def take(self) -> None:
        now = self.clock()
        self.tokens = min(self.per_s, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens < 1:
            await asyncio.sleep((1 - self.tokens) / self.per_s)
            self.tokens, self.at = 1.0, self.clock()
        self.tokens -= 1


class Bridge:
    def __init__(self, mem: Path, publish: Publish, cursor_path: Path, *, poll_s: float = 1.0,
                 max_per_s: float = 200.0) -> None:
        self.mem = mem
        self.publish = publish
        self.cursor_path = cursor_path
        self.poll_s = poll_s
        self.rate = RateLimit(max_per_s)
        self.stats = Stats()
        self.cursor: dict[str, Any] = self._load_cursor()

    # ------------------------------------------------------------ the cursor

    def _load_cursor(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"files": {}, "lessons": {}, "tasks": {}}
        try:
            doc = json.loads(self.cursor_path.read_text())
        except FileNotFoundError:
            return empty
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            # Written atomically, so this is someone else's damage: start over (ids keep it idempotent).
            log.warning("bridge_cursor_unreadable", path=str(self.cursor_path), error=repr(exc))
            return empty
        return {**empty, **doc} if isinstance(doc, dict) else empty

    def _save_cursor(self) -> None:
        atomic_write_json(self.cursor_path, self.cursor, mode=0o600, indent=None)

    # ------------------------------------------------------------ one poll

    async def poll(self) -> None:
        """Look at every file once; publish what is new; save the cursor after each file's events."""
        self.stats.polls += 1
        await self._json_file("lessons.json", "lesson.created", "lessons", self._lesson_events)
        await self._json_file("state_dump.json", "task.completed", "tasks", self._task_events)
        await self._appended(feedback_file(self.mem), "feedback.given", feedback_event)
        await self._appended(approved_file(self.mem), "prompt.approved", approved_event)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away, a disk error: the cursor holds; try again next poll
                log.warning("bridge_poll_failed", error=f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
            except TimeoutError:
                pass

    async def _send(self, subject: str, event: Event) -> None:
        await self.rate.take()
        new = await self.publish(subject, event)
        if new:
            self.stats.published += 1
            self.stats.by_subject[subject] = self.stats.by_subject.get(subject, 0) + 1
        else:
            self.stats.duplicates += 1

    def _bad(self, item: Bad) -> None:
        self.stats.bad += 1
        log.warning("bridge_bad_record", record=str(item))

    async def _json_file(self, name: str, subject: str, kind: str,
                         events: Callable[[Any], list[tuple[Event | Bad, str, str]]]) -> None:
        path = self.mem / name
        st = _stat(path)
        if st is None or self.cursor["files"].get(name) == st:
            return
        try:
            text = path.read_text(encoding="utf-8")
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            self.stats.half_read += 1  # Venom is in the middle of its write: the next poll reads it again
            return
        except FileNotFoundError:
            return
        seen: dict[str, str] = self.cursor[kind]
        keep: dict[str, str] = {}
        try:
            for item, key, mark in events(doc):
                keep[key] = mark
                if seen.get(key) == mark:
                    continue
                if isinstance(item, Bad):
                    self._bad(item)
                else:
                    await self._send(subject, item)
                seen[key] = mark
        finally:
            self._save_cursor()
        if kind == "tasks":  # Venom keeps its last 1000 tasks: the cursor keeps those it still has
            self.cursor[kind] = {k: v for k, v in seen.items() if k in keep}
        self.cursor["files"][name] = st
        self._save_cursor()

    def _lesson_events(self, doc: Any) -> list[tuple[Event | Bad, str, str]]:
        out: list[tuple[Event | Bad, str, str]] = []
        first: dict[str, str] = self.cursor.setdefault("lesson_first", {})
        for index, raw in enumerate(_records(doc, "lessons", "lesson_id")):
            rid = str(raw.get("lesson_id") or raw.get("id") or f"#{index}") if isinstance(raw, dict) else f"#{index}"
            mark = _digest(raw)
            try:
                original = first.setdefault(rid, mark)
                out.append((lesson_event(raw, None if mark == original else f"venom-lesson-{rid}-{mark[:12]}"),
                            rid, mark))
            except RECORD_ERRORS as exc:
                out.append((bad("lessons.json", index, raw, exc, "lesson_id", "id"), rid, mark))
        return out

    def _task_events(self, doc: Any) -> list[tuple[Event | Bad, str, str]]:
        out: list[tuple[Event | Bad, str, str]] = []
        for index, raw in enumerate(_records(doc, "tasks", "id")):
            rid = str(raw.get("id") or raw.get("task_id") or f"#{index}") if isinstance(raw, dict) else f"#{index}"
            mark = task_status(raw) if isinstance(raw, dict) else ""  # one event per status seen
            try:
                out.append((task_event(raw), rid, mark))
            except RECORD_ERRORS as exc:
                out.append((bad("state_dump.json", index, raw, exc, "id", "task_id"), rid, mark))
        return out

    async def _appended(self, path: Path, subject: str, parse: Callable[[bytes], Event]) -> None:
        name = path.name
        st = _stat(path)
        if st is None:
            return
        saved = self.cursor["files"].get(name) or [None, 0, None]
        offset = int(saved[1]) if len(saved) > 1 else 0
        if saved[0] is not None and (st[0] != saved[0] or st[1] < offset):
            offset = 0  # replaced or truncated: from the start (the ids drop what was sent before)
        if st[1] == offset and saved[0] == st[0]:
            return
        items, end = await asyncio.to_thread(jsonl, path, parse, offset)
        for item in items:
            if isinstance(item, Bad):
                self._bad(item)
            else:
                await self._send(subject, item)
        self.cursor["files"][name] = [st[0], end]
        self._save_cursor()


def default_cursor(data_dir: Path, mem: Path) -> Path:
    key = hashlib.sha256(str(mem.resolve()).encode()).hexdigest()[:12]
    return data_dir / "bridge" / f"venom-{key}.json"


async def jetstream_publisher(nc: Any) -> Publish:
    js = nc.jetstream(timeout=10)

    async def publish(subject: str, event: Event) -> bool:
        ack = await js.publish(subject, event.model_dump_json().encode(), headers={"Nats-Msg-Id": event.event_id})
        return not ack.duplicate

    return publish


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system
