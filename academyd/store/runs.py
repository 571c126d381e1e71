"""Training runs: one row per run through its states; at most one active, which the database enforces
(a partial unique index), across restarts and processes."""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from academyd import events
from academyd.clock import iso, parse_iso
from academyd.store.inbox import Inbox
from academyd.store.outbox import OutboxRows

ACTIVE_RUN_STATES = ("requested", "curating", "training", "evaluating")
RUN_STATES = (*ACTIVE_RUN_STATES, "succeeded", "failed", "refused")


class ActiveRunExists(Exception):
    """A run is already active; the database refuses a second one."""


@dataclass(frozen=True)
class Snapshot:
    """What the policy needs to know, read in one go."""

    new_successful_lessons: int
    lesson_watermark: int
    last_training_ended: datetime | None
    active_run: str | None
    consecutive_failures: int
    last_failure_at: datetime | None


class Runs(Inbox, OutboxRows):
    """Runs (requested at a lesson watermark, with `academy.training.requested` queued in the outbox)."""

    def snapshot(self) -> Snapshot:
        last_ok = self.conn.execute(
            "SELECT lesson_watermark, ended_at FROM runs WHERE state='succeeded' ORDER BY ended_at DESC LIMIT 1"
        ).fetchone()
        watermark = last_ok["lesson_watermark"] if last_ok else 0
        last_ended = parse_iso(last_ok["ended_at"]) if last_ok else None
        new = self.scalar("SELECT COUNT(*) FROM lessons WHERE success=1 AND seq>?", (watermark,))
        active = self.scalar(
            "SELECT run_id FROM runs WHERE state IN ('requested','curating','training','evaluating') LIMIT 1"
        )
        failures = 0
        last_failure: datetime | None = None
        for row in self.conn.execute(
            "SELECT state, ended_at FROM runs WHERE state IN ('succeeded','failed','refused')"
            " ORDER BY requested_at DESC LIMIT 20"
        ):
            if row["state"] == "succeeded":
                break
            failures += 1
            if last_failure is None:
                last_failure = parse_iso(row["ended_at"])
        return Snapshot(
            new_successful_lessons=int(new),
            lesson_watermark=int(watermark),
            last_training_ended=last_ended,
            active_run=active,
            consecutive_failures=failures,
            last_failure_at=last_failure,
        )

    def create_run(self, *, reason: str, forced: bool, new_lessons: int, now: datetime, attempt: int = 1) -> str:
        """Record a requested run and queue `academy.training.requested`; one transaction.

        Raises ActiveRunExists when a run is active (the partial unique index says so, not a check here).
        """
        run_id = f"run-{now.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        watermark = self.max_lesson_seq()
        try:
            with self.transaction():
                self.conn.execute(
                    "INSERT INTO runs(run_id, state, reason, forced, lesson_watermark, new_lessons, requested_at,"
                    " attempt) VALUES (?,?,?,?,?,?,?,?)",
                    (run_id, "requested", reason, int(forced), watermark, new_lessons, iso(now), attempt),
                )
                events.emit(self, "academy.training.requested", run_id, now,
                            {"run_id": run_id, "reason": reason, "forced": forced, "new_lessons": new_lessons})
        except sqlite3.IntegrityError as exc:
            if "runs_one_active" in str(exc) or "UNIQUE constraint failed: index" in str(exc):
                raise ActiveRunExists(self.scalar(
                    "SELECT run_id FROM runs WHERE state IN ('requested','curating','training','evaluating')"
                )) from None
            raise
        return run_id

    def set_run_state(self, run_id: str, state: str, now: datetime, **fields: Any) -> None:
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}")
        sets = ["state=?"]
        values: list[Any] = [state]
        if state not in ACTIVE_RUN_STATES:
            sets.append("ended_at=?")
            values.append(iso(now))
        elif state != "requested":
            sets.append("started_at=COALESCE(started_at, ?)")
            values.append(iso(now))
        for key, value in fields.items():
            sets.append(f"{key}=?")
            values.append(json.dumps(value) if key == "detail" else value)
        values.append(run_id)
        self.conn.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id=?", values)

    def move_run(self, run_id: str, to: str, now: datetime, *, expected: str | None = None, **fields: Any) -> str:
        """Move a run to `to` if the rules allow it from the state it is in (and that state is `expected`,
        when given): a compare-and-swap on the state read. Call inside a transaction. Returns the state it
        left; raises `academyd.runs.IllegalTransition` (nothing changed) otherwise."""
        from academyd.runs import IllegalTransition, allowed

        current = self.scalar("SELECT state FROM runs WHERE run_id=?", (run_id,))
        if current is None:
            raise IllegalTransition(f"no run {run_id}")
        if expected is not None and current != expected:
            raise IllegalTransition(f"run {run_id} is {current}, not {expected}")
        if not allowed(current, to):
            raise IllegalTransition(f"run {run_id} cannot go from {current} to {to}")
        sets = {"state": to, **fields}
        before = self.conn.total_changes
        self.set_run_state(run_id, to, now, **fields)
        changed = self.conn.total_changes - before
        if changed != 1 or self.scalar("SELECT state FROM runs WHERE run_id=?", (run_id,)) != sets["state"]:
            raise IllegalTransition(f"run {run_id} changed under the move to {to}")
        return str(current)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return None if row is None else dict(row)

    def active_run(self) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT * FROM runs WHERE state IN ('requested','curating','training','evaluating') LIMIT 1"
        ).fetchone()
        return None if row is None else dict(row)

    def recent_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY requested_at DESC LIMIT ?", (limit,))]

    def runs_by_state(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT state, COUNT(*) FROM runs GROUP BY state").fetchall())

    def run_durations(self) -> list[tuple[str, str]]:
        """(started_at, ended_at) of every run that started and ended (succeeded or failed)."""
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT started_at, ended_at FROM runs WHERE started_at IS NOT NULL AND ended_at IS NOT NULL"
            " AND state IN ('succeeded','failed')"
        )]
