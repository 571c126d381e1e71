"""The inbox (one row per event id: idempotency) and what inbound events become: lessons, commits, tasks."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from pydantic_core import to_json  # the hot path: pydantic-core's serializer, several times json's speed

from academyd.clock import iso
from academyd.store.connection import Connection


class Inbox(Connection):
    # ------------------------------------------------------------ writing (inside ingest's transaction)

    def claim(self, event_id: str, subject: str, stream_seq: int | None, now: datetime) -> bool:
        """Write the inbox row; False when the event id was seen before (a duplicate: do nothing)."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO inbox(event_id, subject, stream_seq, received_at) VALUES (?,?,?,?)",
            (event_id, subject, stream_seq, iso(now)),
        )
        return cur.rowcount == 1

    def insert_lesson(self, ev: Any, success: bool, now: datetime) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO lessons(event_id, lesson_id, timestamp, situation, action, result, feedback,"
            " tags, metadata, success, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                ev.event_id,
                ev.lesson_id,
                iso(ev.timestamp),
                ev.situation,
                ev.action,
                ev.result,
                ev.feedback,
                to_json(ev.tags).decode(),
                to_json(ev.metadata, fallback=str).decode(),
                int(success),
                iso(now),
            ),
        )
        return cur.rowcount == 1

    def insert_commit(self, ev: Any, now: datetime) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO commits(event_id, repo, sha, branch, message, author, pushed_at, received_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (ev.event_id, ev.repo, ev.sha.lower(), ev.branch, ev.message, ev.author, iso(ev.pushed_at), iso(now)),
        )
        return cur.rowcount == 1

    def insert_task(self, ev: Any, success: bool, now: datetime, *, served: str | None = None,
                    rank: int = 2, empty: bool = False, leak: bool = False) -> bool:
        """Store a task, or move a stored one forward (academyd.attribution): a later event replaces the
        row when its status ranks higher (PENDING < PROCESSING < finished). False when nothing changed (a
        status at or below the stored one). A task gets its `done_seq` when it first reaches a finished
        status: the order the watch reads outcomes in."""
        served = served if served is not None else ev.model_version
        done = "(SELECT COALESCE(MAX(done_seq), 0) + 1 FROM tasks)" if rank >= 2 else "NULL"
        values = (
            ev.event_id, ev.task_id, ev.content, ev.result, ev.status, json.dumps(ev.logs, ensure_ascii=False),
            None if ev.context_history is None else json.dumps(ev.context_history, ensure_ascii=False),
            ev.model_version, int(success), iso(now), iso(getattr(ev, "created_at", None)),
            None if getattr(ev, "context_used", None) is None else ev.context_used.model_dump_json(),
            served, rank, int(empty), int(leak), iso(now),
        )
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO tasks(event_id, task_id, content, result, status, logs, context_history,"
            " model_version, success, received_at, created_at, context_used, served_version, status_rank, empty,"
            f" leak, updated_at, done_seq) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,{done})",
            values,
        )
        if cur.rowcount == 1:
            return True
        cur = self.conn.execute(
            "UPDATE tasks SET event_id=?, content=?, result=?, status=?, logs=?,"
            " context_history=COALESCE(?, context_history), model_version=COALESCE(?, model_version), success=?,"
            " created_at=COALESCE(?, created_at), context_used=COALESCE(?, context_used),"
            " served_version=COALESCE(?, served_version), status_rank=?, empty=?, leak=?, updated_at=?,"
            f" done_seq=COALESCE(done_seq, {done}) WHERE task_id=? AND status_rank < ?",
            (values[0], *values[2:8], values[8], *values[10:12], values[12], values[13], values[14], values[15],
             values[16], ev.task_id, rank),
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------ reading

    def claimed(self, event_id: str) -> bool:
        """Whether the event id is in the inbox (stored, or a duplicate of a stored one)."""
        return bool(self.scalar("SELECT 1 FROM inbox WHERE event_id=?", (event_id,)))

    def counts(self) -> dict[str, int]:
        return {
            "lesson.created": int(self.scalar("SELECT COUNT(*) FROM lessons")),
            "commit.pushed": int(self.scalar("SELECT COUNT(*) FROM commits")),
            "task.completed": int(self.scalar("SELECT COUNT(*) FROM tasks")),
        }

    def successful_lessons(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM lessons WHERE success=1"))

    def max_lesson_seq(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(seq), 0) FROM lessons"))

    def task_outcomes(self, version: str, limit: int) -> list[bool]:
        """Success of the last `limit` tasks served by `version`, oldest first."""
        rows = self.conn.execute(
            "SELECT success FROM tasks WHERE model_version=? ORDER BY seq DESC LIMIT ?", (version, limit)
        ).fetchall()
        return [bool(r[0]) for r in reversed(rows)]

    # The curator's sources, in arrival order; rows come as they are read (a cursor, not a list).

    def lesson_rows(self) -> Iterator[sqlite3.Row]:
        """(seq, lesson_id, situation, action, result, feedback, metadata, received_at) of every lesson."""
        return self.conn.execute(
            "SELECT seq, lesson_id, situation, action, result, feedback, metadata, received_at FROM lessons"
            " ORDER BY seq"
        )

    def task_rows(self) -> Iterator[sqlite3.Row]:
        """(seq, task_id, content, result, status, context_history, received_at) of every task."""
        return self.conn.execute(
            "SELECT seq, task_id, content, result, status, context_history, received_at FROM tasks ORDER BY seq"
        )

    def commit_rows(self) -> list[sqlite3.Row]:
        """(seq, repo, sha, received_at) of every commit."""
        return self.conn.execute("SELECT seq, repo, sha, received_at FROM commits ORDER BY seq").fetchall()
