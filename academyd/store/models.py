"""The model registry's tables: every adapter version (`models`) with what happened to it
(`model_history`), the `champion` alias (`model_aliases`) and every champion move (`champion_moves`).

academyd.registry and academyd.champion decide; these are their reads and writes, each meant to run
inside the caller's transaction where a move is several of them.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from typing import Any

from academyd.clock import iso
from academyd.store.connection import Connection

CHAMPION = "champion"
JSON_COLUMNS = ("packages", "metrics", "verdict", "artifacts")


class Models(Connection):
    # ------------------------------------------------------------ reading

    def champion_version(self) -> str | None:
        """The version the `champion` alias points at; None: the base model."""
        return self.scalar("SELECT version FROM model_aliases WHERE alias=?", (CHAMPION,))

    def get_version(self, version: str) -> dict[str, Any] | None:
        """One version, whole (JSON columns decoded, `is_champion`), with its history
        (`history`: [{action, reason, at}]); None when there is no such version."""
        d = self._version_row(self.conn.execute("SELECT * FROM models WHERE version=?", (version,)).fetchone())
        if d is not None:
            d["history"] = [
                dict(r) for r in self.conn.execute(
                    "SELECT action, reason, at FROM model_history WHERE version=? ORDER BY id", (version,))
            ]
        return d

    def list_versions(self) -> list[dict[str, Any]]:
        """Every version, oldest first (without history)."""
        rows = self.conn.execute("SELECT * FROM models ORDER BY seq").fetchall()
        return [d for d in (self._version_row(r) for r in rows) if d is not None]

    def version_of_run(self, run_id: str) -> str | None:
        return self.scalar("SELECT version FROM models WHERE run_id=?", (run_id,))

    def next_model_seq(self) -> int:
        return int(self.scalar("SELECT COALESCE(MAX(seq), 0) + 1 FROM models"))

    def verdict_counts(self) -> dict[str, int] | None:
        """Versions per arena verdict (`promote`, `reject`); None when the registry has no verdicts column."""
        if not self.has_column("models", "verdict"):
            return None
        return dict(self.conn.execute(
            "SELECT json_extract(verdict, '$.verdict'), COUNT(*) FROM models WHERE verdict IS NOT NULL"
            " AND json_valid(verdict) GROUP BY 1"
        ).fetchall())

    def _version_row(self, row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        d = dict(row)
        for key in JSON_COLUMNS:
            d[key] = json.loads(d[key]) if d.get(key) else ({} if key != "verdict" else None)
        d["is_champion"] = self.champion_version() == d["version"]
        return d

    # ------------------------------------------------------------ writing

    def insert_model(self, *, version: str, seq: int, parent: str | None, run_id: str, base_model: str,
                     dataset_id: str | None, dataset_hash: str | None, dataset_format: str | None,
                     heldout_path: str | None, spec_hash: str | None, backend: str | None,
                     packages: dict[str, Any], adapter_path: str, adapter_sha256: str, now: datetime) -> None:
        """A new `candidate` version."""
        self.conn.execute(
            "INSERT INTO models(version, seq, parent, run_id, base_model, dataset_id, dataset_hash,"
            " dataset_format, heldout_path, spec_hash, backend, packages, adapter_path, adapter_sha256,"
            " status, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (version, seq, parent, run_id, base_model, dataset_id, dataset_hash, dataset_format, heldout_path,
             spec_hash, backend, json.dumps(packages), adapter_path, adapter_sha256, "candidate", iso(now)),
        )

    def add_model_history(self, version: str, action: str, reason: str, now: datetime) -> None:
        self.conn.execute(
            "INSERT INTO model_history(version, action, reason, at) VALUES (?,?,?,?)",
            (version, action, reason, iso(now)),
        )

    def set_model_evaluation(self, version: str, *, metrics: dict[str, Any], verdict: dict[str, Any], status: str,
                             now: datetime) -> None:
        self.conn.execute(
            "UPDATE models SET metrics=?, verdict=?, status=?, evaluated_at=? WHERE version=?",
            (json.dumps(metrics), json.dumps(verdict), status, iso(now), version),
        )

    def set_model_artifacts(self, version: str, artifacts: dict[str, Any]) -> None:
        self.conn.execute("UPDATE models SET artifacts=? WHERE version=?", (json.dumps(artifacts), version))

    def set_model_status(self, version: str, status: str) -> None:
        """`retired` or `rejected` (a champion is made with `make_champion`)."""
        self.conn.execute("UPDATE models SET status=? WHERE version=?", (status, version))

    def make_champion(self, version: str, artifacts: dict[str, Any], now: datetime) -> None:
        """`version` becomes `champion` (with the artifacts it was promoted with) and the alias moves to it.
        The previous champion must have left that status first (one champion, by a unique index)."""
        self.conn.execute("UPDATE models SET status='champion', promoted_at=?, artifacts=? WHERE version=?",
                          (iso(now), json.dumps(artifacts), version))
        self.conn.execute(
            "INSERT INTO model_aliases(alias, version, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT(alias) DO UPDATE SET version=excluded.version, updated_at=excluded.updated_at",
            (CHAMPION, version, iso(now)),
        )

    def clear_champion(self) -> None:
        """No champion: Venom runs the base model."""
        self.conn.execute("DELETE FROM model_aliases WHERE alias=?", (CHAMPION,))

    def record_champion_move(self, *, action: str, from_version: str | None, to_version: str | None,
                             basis: str | None, reason: str, now: datetime) -> bool:
        """Record a promote or rollback; False (nothing written) when its `basis` was acted on already."""
        try:
            self.conn.execute(
                "INSERT INTO champion_moves(action, from_version, to_version, basis, reason, at)"
                " VALUES (?,?,?,?,?,?)", (action, from_version, to_version, basis, reason, iso(now)))
        except sqlite3.IntegrityError:
            if basis is not None and self.scalar("SELECT 1 FROM champion_moves WHERE basis=?", (basis,)):
                return False
            raise
        return True

    def champion_generation(self) -> int:
        """The generation of the desired serving state: the id of the last champion move (every promote and
        rollback increases it; 0 before the first). Read inside a move's transaction, it is that move's."""
        return int(self.scalar("SELECT COALESCE(MAX(id), 0) FROM champion_moves") or 0)
