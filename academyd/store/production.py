"""What production says about the versions (#20): thumbs (`feedback`), approved answers (`approved_pairs`),
each version's task outcomes in the order they finished, and the watch's end state per promotion
(`watch_decisions`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from academyd.clock import iso
from academyd.store.connection import Connection

# A task's outcome: its status (success) unless a thumb says otherwise (the latest thumb wins).
_OUTCOMES = """
SELECT t.task_id, t.done_seq, t.success, t.empty, t.leak, t.status,
       (SELECT f.rating FROM feedback f WHERE f.task_id = t.task_id ORDER BY f.seq DESC LIMIT 1) AS rating
FROM tasks t WHERE t.served_version = ? AND t.status_rank >= 2 AND t.done_seq > ?
ORDER BY t.done_seq {order} LIMIT ?
"""


class Production(Connection):
    # ------------------------------------------------------------ writing (inside ingest's transaction)

    def insert_feedback(self, ev: Any, now: datetime) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO feedback(event_id, task_id, rating, comment, intent, timestamp, received_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (ev.event_id, ev.task_id, ev.rating, ev.comment, ev.intent, iso(ev.timestamp), iso(now)),
        )
        return cur.rowcount == 1

    def insert_approved_pair(self, ev: Any, now: datetime) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO approved_pairs(event_id, task_id, prompt, approved_response, intent, prompt_hash,"
            " note, timestamp, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (ev.event_id, ev.task_id, ev.prompt, ev.approved_response, ev.intent, ev.prompt_hash, ev.note,
             iso(ev.timestamp), iso(now)),
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------ reading

    def served_outcomes(self, version: str, *, thumbs: bool, after_done_seq: int = 0,
                        latest: int | None = None) -> list[dict[str, Any]]:
        """The finished tasks `version` served (after `after_done_seq`), in the order they finished, each
        {task_id, done_seq, ok, empty, leak, failed, thumb}; `latest`: only the last so many."""
        order = "DESC" if latest is not None else "ASC"
        rows = self.conn.execute(_OUTCOMES.format(order=order),
                                 (version, after_done_seq, latest if latest is not None else -1)).fetchall()
        out = [{
            "task_id": r["task_id"], "done_seq": r["done_seq"], "thumb": r["rating"],
            "ok": (r["rating"] == "up") if (thumbs and r["rating"]) else bool(r["success"]),
            "empty": bool(r["empty"]), "leak": bool(r["leak"]), "failed": not bool(r["success"]),
        } for r in rows]
        return out[::-1] if latest is not None else out

    def done_seq_at(self, when: str) -> int:
        """The last task that had finished before `when` (an ISO time): where a promotion's record starts."""
        return int(self.scalar("SELECT COALESCE(MAX(done_seq), 0) FROM tasks WHERE status_rank >= 2 AND updated_at < ?",
                               (when,)))

    def feedback_count(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM feedback"))

    def approved_pair_rows(self) -> Iterator[sqlite3.Row]:
        """(seq, task_id, prompt, approved_response, intent, received_at) of every approved pair (curation)."""
        return self.conn.execute(
            "SELECT seq, event_id, task_id, prompt, approved_response, intent, received_at FROM approved_pairs"
            " ORDER BY seq"
        )

    def attribution_counts(self) -> dict[str, dict[str, int]]:
        """Per served version: finished tasks, successes by status, thumbs up and down."""
        out: dict[str, dict[str, int]] = {}
        for r in self.conn.execute(
            "SELECT COALESCE(t.served_version, '') AS v, COUNT(*) AS n, SUM(t.success) AS ok,"
            " SUM(EXISTS(SELECT 1 FROM feedback f WHERE f.task_id=t.task_id AND f.rating='up')) AS up,"
            " SUM(EXISTS(SELECT 1 FROM feedback f WHERE f.task_id=t.task_id AND f.rating='down')) AS down"
            " FROM tasks t WHERE t.status_rank >= 2 GROUP BY v"
        ):
            out[r["v"] or "unknown"] = {"tasks": r["n"], "successes": r["ok"] or 0, "thumbs_up": r["up"] or 0,
                                        "thumbs_down": r["down"] or 0}
        return out

    # ------------------------------------------------------------ the watch's end state

    def record_decision(self, champion: str, promoted_at: str, parent: str, state: str, cause: str,
                        at_task: int, reason: str, stats: dict[str, Any], now: datetime, *,
                        replace: bool = False) -> bool:
        """The watch's end state for this promotion (the first one stands, unless `replace`: a guardrail's
        rollback after `confirmed`); False when nothing was written."""
        cur = self.conn.execute(
            f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO watch_decisions(champion, promoted_at, parent, state, cause, at_task, reason,"
            " stats, decided_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (champion, promoted_at, parent, state, cause, at_task, reason, json.dumps(stats), iso(now)),
        )
        return cur.rowcount == 1

    def record_latest(self, champion: str, promoted_at: str, parent: str, state: str, reason: str,
                      stats: dict[str, Any], now: datetime) -> None:
        """The watch's latest assessment of `champion` (replaces the one before; the series left out)."""
        slim = {k: v for k, v in stats.items() if k != "series"}
        self.conn.execute(
            "INSERT OR REPLACE INTO watch_latest(champion, promoted_at, parent, state, reason, stats, at)"
            " VALUES (?,?,?,?,?,?,?)", (champion, promoted_at, parent, state, reason, json.dumps(slim), iso(now)))

    def latest_assessments(self) -> list[dict[str, Any]]:
        return [_decision(r) for r in self.conn.execute("SELECT * FROM watch_latest ORDER BY at DESC")]

    def decision_counts(self) -> dict[tuple[str, str], int]:
        return {(r[0], r[1]): r[2] for r in self.conn.execute(
            "SELECT state, cause, COUNT(*) FROM watch_decisions GROUP BY state, cause")}

    def thumb_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT rating, COUNT(*) FROM feedback GROUP BY rating")}

    def decision(self, champion: str, promoted_at: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM watch_decisions WHERE champion=? AND promoted_at=?",
                                (champion, promoted_at)).fetchone()
        return None if row is None else _decision(row)

    def decisions(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM watch_decisions ORDER BY decided_at DESC LIMIT ?", (limit,))
        return [_decision(r) for r in rows]

    def decisions_of(self, champion: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM watch_decisions WHERE champion=? ORDER BY decided_at", (champion,))
        return [_decision(r) for r in rows]


def _decision(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["stats"] = json.loads(d["stats"])
    return d
