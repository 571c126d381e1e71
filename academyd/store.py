"""SQLite, the system of record: events, the inbox (idempotency), the outbox, runs, the DLQ.

One file (`academy.db`), WAL, `synchronous=FULL`. Migrations are named SQL scripts applied once, in
order; other modules (curator, registry, habitat) add theirs to `MIGRATIONS` under a name of their own.

The store is synchronous on purpose: SQLite calls are short, and a batch of inbound events is written in
one transaction, so the daemon commits once per fetched batch, not once per event.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic_core import to_json  # the hot path: pydantic-core's serializer, several times json's speed

from academyd import events
from academyd.clock import iso, parse_iso, utcnow  # noqa: F401  (re-exported: the store's time format)

ACTIVE_RUN_STATES = ("requested", "curating", "training", "evaluating")
RUN_STATES = (*ACTIVE_RUN_STATES, "succeeded", "failed", "refused", "cancelled")

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE inbox(
            event_id    TEXT PRIMARY KEY,
            subject     TEXT NOT NULL,
            stream_seq  INTEGER,
            received_at TEXT NOT NULL
        );
        CREATE TABLE lessons(
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id    TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
            lesson_id   TEXT NOT NULL UNIQUE,
            timestamp   TEXT NOT NULL,
            situation   TEXT NOT NULL,
            action      TEXT NOT NULL,
            result      TEXT NOT NULL,
            feedback    TEXT,
            tags        TEXT NOT NULL,
            metadata    TEXT NOT NULL,
            success     INTEGER NOT NULL,
            received_at TEXT NOT NULL
        );
        CREATE INDEX lessons_success ON lessons(success, seq);
        CREATE TABLE commits(
            seq         INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id    TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
            repo        TEXT NOT NULL,
            sha         TEXT NOT NULL,
            branch      TEXT NOT NULL,
            message     TEXT,
            author      TEXT,
            pushed_at   TEXT,
            received_at TEXT NOT NULL,
            UNIQUE(repo, sha)
        );
        CREATE TABLE tasks(
            seq             INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id        TEXT NOT NULL UNIQUE REFERENCES inbox(event_id),
            task_id         TEXT NOT NULL UNIQUE,
            content         TEXT NOT NULL,
            result          TEXT,
            status          TEXT NOT NULL,
            logs            TEXT NOT NULL,
            context_history TEXT,
            model_version   TEXT,
            success         INTEGER NOT NULL,
            received_at     TEXT NOT NULL
        );
        CREATE INDEX tasks_model ON tasks(model_version, seq);
        CREATE TABLE dlq(
            id          INTEGER PRIMARY KEY AUTOINCREMENT,
            subject     TEXT NOT NULL,
            event_id    TEXT,
            stream_seq  INTEGER,
            reason      TEXT NOT NULL,
            detail      TEXT,
            excerpt     TEXT,
            at          TEXT NOT NULL,
            UNIQUE(subject, stream_seq)
        );
        CREATE TABLE outbox(
            id           INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id       TEXT NOT NULL UNIQUE,
            subject      TEXT NOT NULL,
            payload      TEXT NOT NULL,
            created_at   TEXT NOT NULL,
            published_at TEXT,
            attempts     INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX outbox_pending ON outbox(id) WHERE published_at IS NULL;
        CREATE TABLE runs(
            run_id           TEXT PRIMARY KEY,
            state            TEXT NOT NULL CHECK(state IN ('requested','curating','training','evaluating',
                                                           'succeeded','failed','refused','cancelled')),
            reason           TEXT NOT NULL,
            forced           INTEGER NOT NULL,
            lesson_watermark INTEGER NOT NULL,
            new_lessons      INTEGER NOT NULL,
            requested_at     TEXT NOT NULL,
            started_at       TEXT,
            ended_at         TEXT,
            attempt          INTEGER NOT NULL DEFAULT 1,
            dataset_id       TEXT,
            version          TEXT,
            habitat          TEXT,
            job_ref          TEXT,
            error            TEXT,
            detail           TEXT NOT NULL DEFAULT '{}'
        );
        -- The database itself enforces at most one active run, across restarts and processes.
        CREATE UNIQUE INDEX runs_one_active
            ON runs((state IN ('requested','curating','training','evaluating')))
            WHERE state IN ('requested','curating','training','evaluating');
        CREATE INDEX runs_ended ON runs(state, ended_at);
        """,
    ),
    (
        # academyd.curator: every dataset build (refused ones too), and the split every source record
        # was first given, so that a record once held out stays held out in every later build.
        "0002_datasets",
        """
        CREATE TABLE datasets(
            dataset_id    TEXT PRIMARY KEY,
            run_id        TEXT,
            created_at    TEXT NOT NULL,
            format        TEXT NOT NULL,
            path          TEXT,
            heldout_path  TEXT,
            manifest_path TEXT,
            content_hash  TEXT,
            examples      INTEGER NOT NULL,
            heldout       INTEGER NOT NULL,
            counts        TEXT NOT NULL,
            dropped       TEXT NOT NULL,
            refused       TEXT,
            manifest      TEXT NOT NULL
        );
        CREATE INDEX datasets_created ON datasets(created_at);
        CREATE TABLE dataset_members(
            record_key       TEXT PRIMARY KEY,
            split            TEXT NOT NULL CHECK(split IN ('train','heldout')),
            first_dataset_id TEXT NOT NULL
        );
        """,
    ),
    (
        # academyd.registry: every adapter version with its genealogy, the `champion` alias, and what
        # happened to each version (evaluated, promoted, rolled back) in order.
        "0003_registry",
        """
        CREATE TABLE models(
            version        TEXT PRIMARY KEY,
            seq            INTEGER NOT NULL UNIQUE,
            parent         TEXT REFERENCES models(version),
            run_id         TEXT UNIQUE,
            base_model     TEXT NOT NULL,
            dataset_id     TEXT,
            dataset_hash   TEXT,
            dataset_format TEXT,
            heldout_path   TEXT,
            spec_hash      TEXT,
            backend        TEXT,
            packages       TEXT NOT NULL DEFAULT '{}',
            adapter_path   TEXT NOT NULL,
            adapter_sha256 TEXT NOT NULL,
            metrics        TEXT NOT NULL DEFAULT '{}',
            verdict        TEXT,
            status         TEXT NOT NULL CHECK(status IN ('candidate','champion','retired','rejected')),
            created_at     TEXT NOT NULL,
            evaluated_at   TEXT,
            promoted_at    TEXT,
            artifacts      TEXT NOT NULL DEFAULT '{}'
        );
        CREATE UNIQUE INDEX models_one_champion ON models(status) WHERE status='champion';
        CREATE TABLE model_aliases(
            alias      TEXT PRIMARY KEY,
            version    TEXT REFERENCES models(version),
            updated_at TEXT NOT NULL
        );
        CREATE TABLE model_history(
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            version TEXT NOT NULL REFERENCES models(version),
            action  TEXT NOT NULL,
            reason  TEXT NOT NULL,
            at      TEXT NOT NULL
        );
        CREATE INDEX model_history_version ON model_history(version, id);
        """,
    ),
]


MIGRATIONS.append((
    # academyd.outbox: a row that keeps failing is parked (with its error) instead of blocking later rows;
    # published rows are pruned after outbox.retention_h.
    "0004_outbox_parking",
    """
    ALTER TABLE outbox ADD COLUMN last_error TEXT;
    ALTER TABLE outbox ADD COLUMN last_attempt_at TEXT;
    ALTER TABLE outbox ADD COLUMN parked_at TEXT;
    DROP INDEX outbox_pending;
    CREATE INDEX outbox_pending ON outbox(id) WHERE published_at IS NULL AND parked_at IS NULL;
    CREATE INDEX outbox_published ON outbox(published_at) WHERE published_at IS NOT NULL;
    """,
))


MIGRATIONS.append((
    # Venom's task as Venom writes it: when it was created and which lessons/memory it was given.
    "0005_venom_task_shape",
    """
    ALTER TABLE tasks ADD COLUMN created_at TEXT;
    ALTER TABLE tasks ADD COLUMN context_used TEXT;
    """,
))


MIGRATIONS.append((
    # academyd.promotion: every champion move (promote, rollback) in commit order, with what it acted on
    # (`basis`: a verdict's or a watch decision's id, usable once); academyd.champion.monitor: what the
    # watch did about a champion (rolled back, or was refused), which starts its cooldown.
    "0006_champion_moves",
    """
    CREATE TABLE champion_moves(
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        action       TEXT NOT NULL CHECK(action IN ('promote','rollback')),
        from_version TEXT,
        to_version   TEXT,
        basis        TEXT UNIQUE,
        reason       TEXT NOT NULL,
        at           TEXT NOT NULL
    );
    CREATE TABLE champion_watch(
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        champion TEXT NOT NULL,
        outcome  TEXT NOT NULL CHECK(outcome IN ('rolled_back','refused')),
        reason   TEXT NOT NULL,
        at       TEXT NOT NULL
    );
    """,
))


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


class Store:
    """The SQLite store. Not thread-safe: one Store per thread (open another for worker threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._depth = 0

    @classmethod
    def open(cls, path: Path) -> Store:
        store = cls(path)
        store.migrate()
        return store

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ plumbing

    def migrate(self) -> list[str]:
        """Apply the migrations not yet applied; return their names."""
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {r[0] for r in self.conn.execute("SELECT name FROM schema_migrations")}
        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                for statement in _split_sql(sql):
                    self.conn.execute(statement)
                self.conn.execute(
                    "INSERT INTO schema_migrations(name, applied_at) VALUES (?, ?)", (name, iso(utcnow()))
                )
            applied.append(name)
        return applied

    @contextmanager
    def transaction(self, busy_ms: int | None = None) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; a nested call is a SAVEPOINT inside it.

        An exception out of a nested block undoes that block's writes only (ROLLBACK TO its savepoint) and
        goes on up: the outer transaction fails with it unless the caller catches it, and when the caller
        does, the outer transaction is still usable and commits without the inner writes.
        `busy_ms` bounds the wait for another connection's write lock (the default waits 30 s); it has no
        effect on a nested call (the lock is held already).
        """
        if self._depth:
            yield from self._savepoint()
            return
        if busy_ms is None:
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            finally:
                self.conn.execute("PRAGMA busy_timeout=30000")
        self._depth = 1
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            self._depth = 0
            # SQLite may have rolled back by itself (disk full, I/O error): the original error matters.
            if self.conn.in_transaction:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        self._depth = 0

    def _savepoint(self) -> Iterator[sqlite3.Connection]:
        name = f"s{self._depth}"  # unique along the stack of open savepoints
        self.conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield self.conn
        except BaseException:
            self._depth -= 1
            # When SQLite rolled the whole transaction back by itself (disk full, I/O error) there is no
            # savepoint left to go back to: the outer transaction meets the same state, the error matters.
            if self.conn.in_transaction:
                try:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                except sqlite3.Error:
                    pass
            raise
        self._depth -= 1
        self.conn.execute(f"RELEASE {name}")

    # Outside ingest, a transaction commits on the loop: measured on this project's 2-core VM (WAL,
    # synchronous=FULL, 200 one-row commits) 0.33 ms median, 0.83 ms at most. Moving those COMMITs to a
    # thread would let other coroutines join the open transaction of the loop's one connection (this
    # class is not thread-safe), for under a millisecond: they stay here.
    #
    # An open-coded transaction for a caller that commits elsewhere (ingest commits on a worker thread so
    # that the fsync overlaps the event loop): begin() ... commit() or rollback(); a transaction()
    # inside it is a savepoint, as inside an outer transaction().

    def begin(self, busy_ms: int | None = None) -> None:
        if busy_ms is not None:
            self.conn.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        finally:
            if busy_ms is not None:
                self.conn.execute("PRAGMA busy_timeout=30000")
        self._depth = 1

    def commit(self) -> None:
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        self._depth = 0

    def rollback(self) -> None:
        self._depth = 0
        if self.conn.in_transaction:  # SQLite may have rolled back by itself (disk full, I/O error)
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------ inbound

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

    def insert_task(self, ev: Any, success: bool, now: datetime) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO tasks(event_id, task_id, content, result, status, logs, context_history,"
            " model_version, success, received_at, created_at, context_used) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                ev.event_id,
                ev.task_id,
                ev.content,
                ev.result,
                ev.status,
                json.dumps(ev.logs, ensure_ascii=False),
                None if ev.context_history is None else json.dumps(ev.context_history, ensure_ascii=False),
                ev.model_version,
                int(success),
                iso(now),
                iso(getattr(ev, "created_at", None)),
                None if getattr(ev, "context_used", None) is None else ev.context_used.model_dump_json(),
            ),
        )
        return cur.rowcount == 1

    def record_dlq(
        self,
        subject: str,
        reason: str,
        detail: str,
        *,
        event_id: str | None,
        stream_seq: int | None,
        excerpt: str,
        now: datetime,
    ) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO dlq(subject, event_id, stream_seq, reason, detail, excerpt, at)"
            " VALUES (?,?,?,?,?,?,?)",
            (subject, event_id, stream_seq, reason, detail, excerpt, iso(now)),
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------ outbox

    def outbox_add(self, subject: str, payload: dict[str, Any], msg_id: str, now: datetime) -> bool:
        """The outbox row writer under academyd.events (which builds and validates every event): call
        `events.emit` / `events.enqueue`, not this, inside the transaction that makes the event true."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO outbox(msg_id, subject, payload, created_at) VALUES (?,?,?,?)",
            (msg_id, subject, json.dumps(payload, ensure_ascii=False, default=str), iso(now)),
        )
        return cur.rowcount == 1

    def outbox_pending(self, limit: int = 100, after_id: int = 0) -> list[sqlite3.Row]:
        """Unpublished, unparked rows after `after_id`, oldest first."""
        return self.conn.execute(
            "SELECT id, msg_id, subject, payload, attempts FROM outbox WHERE published_at IS NULL"
            " AND parked_at IS NULL AND id>? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()

    def outbox_mark_published(self, outbox_id: int, now: datetime) -> None:
        self.conn.execute("UPDATE outbox SET published_at=?, last_attempt_at=?, attempts=attempts+1 WHERE id=?",
                          (iso(now), iso(now), outbox_id))

    def outbox_mark_failed(self, outbox_id: int, error: str, now: datetime, *, max_attempts: int) -> bool:
        """Count a failed attempt and keep its error; park the row once it reached `max_attempts`.
        True when the row is parked now."""
        self.conn.execute(
            "UPDATE outbox SET attempts=attempts+1, last_error=?, last_attempt_at=?,"
            " parked_at=CASE WHEN attempts+1>=? THEN ? ELSE NULL END WHERE id=?",
            (error[:2000], iso(now), max_attempts, iso(now), outbox_id),
        )
        return bool(self.scalar("SELECT parked_at IS NOT NULL FROM outbox WHERE id=?", (outbox_id,)))

    def outbox_parked(self, limit: int = 50) -> list[dict[str, Any]]:
        """Parked rows (newest first), without their payloads."""
        return [dict(r) for r in self.conn.execute(
            "SELECT id, msg_id, subject, attempts, last_error, created_at, parked_at FROM outbox"
            " WHERE parked_at IS NOT NULL AND published_at IS NULL ORDER BY id DESC LIMIT ?", (limit,))]

    def outbox_unpark(self, outbox_id: int | None = None) -> int:
        """Give parked rows (one, or all) another `max_attempts` tries; returns how many."""
        where = "parked_at IS NOT NULL AND published_at IS NULL" + ("" if outbox_id is None else " AND id=?")
        cur = self.conn.execute(f"UPDATE outbox SET parked_at=NULL, attempts=0 WHERE {where}",
                                () if outbox_id is None else (outbox_id,))
        return cur.rowcount

    def outbox_prune(self, before: datetime) -> int:
        """Delete rows published before `before`; returns how many."""
        return self.conn.execute("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at<?",
                                 (iso(before),)).rowcount

    def outbox_counts(self) -> dict[str, int]:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(published_at IS NULL AND parked_at IS NULL), 0),"
            " COALESCE(SUM(published_at IS NULL AND parked_at IS NOT NULL), 0) FROM outbox").fetchone()
        return {"pending": int(row[0]), "parked": int(row[1])}

    # ------------------------------------------------------------ runs

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

    def max_lesson_seq(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(seq), 0) FROM lessons"))

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

    # ------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        return {
            "lesson.created": int(self.scalar("SELECT COUNT(*) FROM lessons")),
            "commit.pushed": int(self.scalar("SELECT COUNT(*) FROM commits")),
            "task.completed": int(self.scalar("SELECT COUNT(*) FROM tasks")),
        }

    def dlq_count(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM dlq"))

    def dlq_by_reason(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT reason, COUNT(*) FROM dlq GROUP BY reason")}

    def recent_dlq(self, limit: int = 50) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM dlq ORDER BY id DESC LIMIT ?", (limit,))]


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (no semicolons inside our literals)."""
    out, buf = [], []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped.startswith("--"):
            continue
        buf.append(line)
        if stripped.endswith(";"):
            out.append("\n".join(buf))
            buf = []
    if "".join(buf).strip():
        out.append("\n".join(buf))
    return [s for s in out if s.strip()]
