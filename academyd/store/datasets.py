"""The curator's tables: every dataset build (refused ones too), and the split every source record was
first given (`dataset_members`), so that a record once held out stays held out in every later build."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from academyd.store.connection import Connection

_COLUMNS = (
    "dataset_id, run_id, created_at, format, path, heldout_path, manifest_path, content_hash,"
    " examples, heldout, counts, dropped, refused"
)


def _dataset_row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    out["counts"] = json.loads(out["counts"])
    out["dropped"] = json.loads(out["dropped"])
    return out


class Datasets(Connection):
    def insert_dataset(self, *, dataset_id: str, run_id: str | None, created_at: str, format: str,
                       path: str | None, heldout_path: str | None, manifest_path: str | None,
                       content_hash: str | None, examples: int, heldout: int, counts: dict[str, Any],
                       dropped: dict[str, Any], refused: str | None, manifest: dict[str, Any]) -> None:
        self.conn.execute(
            f"INSERT INTO datasets({_COLUMNS}, manifest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (dataset_id, run_id, created_at, format, path, heldout_path, manifest_path, content_hash, examples,
             heldout, json.dumps(counts), json.dumps(dropped), refused,
             json.dumps(manifest, ensure_ascii=False, default=str)),
        )

    def add_dataset_members(self, members: list[tuple[str, str, str]]) -> None:
        """(record_key, split, first_dataset_id) rows; a record already remembered keeps its first split."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO dataset_members(record_key, split, first_dataset_id) VALUES (?,?,?)", members
        )

    def dataset_splits(self) -> dict[str, str]:
        """record_key -> the split (`train`, `heldout`) it was first given."""
        return dict(self.conn.execute("SELECT record_key, split FROM dataset_members").fetchall())

    def dataset_ids(self, prefix: str) -> set[str]:
        """The dataset ids that start with `prefix`."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return {r[0] for r in self.conn.execute(
            "SELECT dataset_id FROM datasets WHERE dataset_id LIKE ? ESCAPE '\\'", (f"{escaped}%",))}

    def latest_dataset(self) -> dict[str, Any] | None:
        """The latest build (refused ones included), without its manifest."""
        return _dataset_row(self.conn.execute(
            f"SELECT {_COLUMNS} FROM datasets ORDER BY created_at DESC, rowid DESC LIMIT 1"
        ).fetchone())

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        """One recorded build by id, without its manifest."""
        return _dataset_row(self.conn.execute(
            f"SELECT {_COLUMNS} FROM datasets WHERE dataset_id=?", (dataset_id,)
        ).fetchone())

    def recent_datasets(self, limit: int) -> list[dict[str, Any]]:
        """The latest builds, newest first, as stored (JSON columns and the manifest as text)."""
        return [dict(r) for r in self.conn.execute(
            f"SELECT {_COLUMNS}, manifest FROM datasets ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)
        )]
