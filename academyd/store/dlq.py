"""The dead letters: every inbound message that was refused, with why and a redacted excerpt."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from academyd.clock import iso
from academyd.store.connection import Connection


class DeadLetters(Connection):
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

    def dlq_count(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM dlq"))

    def dlq_by_reason(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT reason, COUNT(*) FROM dlq GROUP BY reason")}

    def recent_dlq(self, limit: int = 50) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM dlq ORDER BY id DESC LIMIT ?", (limit,))]
