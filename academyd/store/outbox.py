"""The outbox: every outbound event, queued in the transaction that makes it true, until it is published
(or parked after the server refused it `max_attempts` times; see academyd.outbox)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from academyd.clock import iso
from academyd.store.connection import Connection


class OutboxRows(Connection):
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

    def outbox_mark_retrying(self, outbox_id: int, error: str, now: datetime) -> None:
        """Keep the error of an attempt the bus failed (an outage): not counted against the row."""
        self.conn.execute("UPDATE outbox SET last_error=?, last_attempt_at=? WHERE id=?",
                          (error[:2000], iso(now), outbox_id))

    def outbox_mark_failed(self, outbox_id: int, error: str, now: datetime, *, max_attempts: int) -> bool:
        """Count an attempt the server refused and keep its error; park the row once it reached
        `max_attempts`. True when the row is parked now."""
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

    def outbox_parked_subjects(self) -> list[str]:
        """Subjects with a parked row: their later rows wait behind it (order per subject)."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT subject FROM outbox WHERE parked_at IS NOT NULL AND published_at IS NULL")]

    def outbox_unsent(self, limit: int = 100) -> list[dict[str, Any]]:
        """Unpublished rows that failed at least once, parked or still retried (oldest first), without
        their payloads: what `academyd outbox list` shows."""
        return [dict(r) for r in self.conn.execute(
            "SELECT id, msg_id, subject, attempts, last_error, last_attempt_at, created_at, parked_at FROM outbox"
            " WHERE published_at IS NULL AND (parked_at IS NOT NULL OR last_error IS NOT NULL)"
            " ORDER BY id LIMIT ?", (limit,))]

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
