"""What the post-promotion watch did about a champion (`champion_watch`: rolled back, or was refused);
its latest entry starts the watch's cooldown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from academyd.clock import iso
from academyd.store.connection import Connection


class ChampionWatch(Connection):
    def record_watch(self, champion: str, outcome: str, reason: str, now: datetime) -> None:
        """`outcome`: `rolled_back` or `refused`."""
        self.conn.execute("INSERT INTO champion_watch(champion, outcome, reason, at) VALUES (?,?,?,?)",
                          (champion, outcome, reason, iso(now)))

    def last_watch(self) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM champion_watch ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else dict(row)
