"""The model registry: every adapter version (v1, v2, ...) with its genealogy, files and verdict.

A version is born a `candidate` when a training run's adapter is registered (`Registry.add_candidate`); the
arena's verdict makes it `rejected` or leaves it a candidate for promotion (`record_verdict`);
`academyd.promotion` makes one `champion` (the previous champion becomes `retired`) and moves the
`champion` alias; a rollback marks the champion `rejected` and brings its parent back.

Files of a version live in `<data>/models/<vN>/`: `adapter/` (the adapter as the trainer wrote it,
tokenizer included), `adapter.sha256sum`, `summary.json`, `loss.jsonl`, and after evaluation
`metrics.json`; promotion adds `Modelfile` and `adapter.gguf`.

`adapter_sha256` is the sha256 of the manifest `adapter.sha256sum`: one line `<sha256 of file>  <path>` per
file under `adapter/` (paths relative to it, '/'-separated, sorted, `sha256sum` format, '\\n' line ends).
So it covers the weights, the adapter config and the tokenizer, and anyone can check a copy with
`cd adapter && sha256sum -c ../adapter.sha256sum` and `sha256sum ../adapter.sha256sum`.

Readers that must not write (the CLI) use the module functions over a read-only connection
(`connect_readonly`, `list_versions`, `get_version`); `Registry` wraps them for the daemon.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from academyd import events
from academyd.settings import Settings
from academyd.store import Store, iso
from schemas.models import version_name

if TYPE_CHECKING:
    from academyd.arena import Verdict

STATUSES = ("candidate", "champion", "retired", "rejected")
CHAMPION = "champion"
MANIFEST_FILE = "adapter.sha256sum"
JSON_COLUMNS = ("packages", "metrics", "verdict", "artifacts")


class RegistryError(Exception):
    """The registry cannot do what was asked; the message says why and what to do."""


# ---------------------------------------------------------------- checksums


def adapter_manifest(adapter_dir: Path) -> str:
    """The `sha256sum`-format manifest of every file under `adapter_dir` (sorted by relative path)."""
    if not adapter_dir.is_dir():
        raise RegistryError(f"adapter directory {adapter_dir} does not exist")
    lines = []
    for path in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(adapter_dir).as_posix()
        lines.append(f"{sha256_file(path)}  {rel}\n")
    if not lines:
        raise RegistryError(f"adapter directory {adapter_dir} is empty")
    return "".join(lines)


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 (hex) of `adapter_manifest(adapter_dir)`: the identity of an adapter's files."""
    return hashlib.sha256(adapter_manifest(adapter_dir).encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- reading (no writes)


def connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A read-only connection to the daemon's database (for the CLI); RegistryError if there is none."""
    if not db_path.is_file():
        raise RegistryError(f"no database at {db_path}: start the daemon once (`academyd run`) or pass --data-dir")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)
    conn.row_factory = sqlite3.Row
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='models'").fetchone()
    if has is None:
        conn.close()
        raise RegistryError(f"{db_path} has no model registry yet: run the daemon of this version once to migrate it")
    return conn


def _row(row: sqlite3.Row | None, conn: sqlite3.Connection) -> dict[str, Any] | None:
    if row is None:
        return None
    d = dict(row)
    for key in JSON_COLUMNS:
        d[key] = json.loads(d[key]) if d.get(key) else ({} if key != "verdict" else None)
    alias = conn.execute("SELECT version FROM model_aliases WHERE alias=?", (CHAMPION,)).fetchone()
    d["is_champion"] = alias is not None and alias[0] == d["version"]
    return d


def get_version(conn: sqlite3.Connection, version: str) -> dict[str, Any] | None:
    """One version, whole, with its history (`history`: [{action, reason, at}])."""
    d = _row(conn.execute("SELECT * FROM models WHERE version=?", (version,)).fetchone(), conn)
    if d is not None:
        d["history"] = [
            dict(r) for r in conn.execute(
                "SELECT action, reason, at FROM model_history WHERE version=? ORDER BY id", (version,))
        ]
    return d


def list_versions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every version, oldest first."""
    rows = conn.execute("SELECT * FROM models ORDER BY seq").fetchall()
    return [d for d in (_row(r, conn) for r in rows) if d is not None]


def champion_version(conn: sqlite3.Connection) -> str | None:
    row = conn.execute("SELECT version FROM model_aliases WHERE alias=?", (CHAMPION,)).fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------- the registry


class Registry:
    """Versions in the daemon's store. Synchronous (short SQLite calls and local file copies)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # ------------------------------------------------------------ reading

    def champion(self) -> dict[str, Any] | None:
        """The version the `champion` alias points at, or None (Venom runs the base model)."""
        v = champion_version(self.store.conn)
        return None if v is None else self.get(v)

    def get(self, version: str) -> dict[str, Any] | None:
        """One version as a dict (JSON columns decoded, `history` added), or None."""
        return get_version(self.store.conn, version)

    def list(self) -> list[dict[str, Any]]:
        """Every version, oldest first."""
        return list_versions(self.store.conn)

    def version_dir(self, version: str) -> Path:
        return self.settings.models_dir / version

    # ------------------------------------------------------------ writing

    def add_candidate(
        self,
        *,
        run_id: str,
        adapter_src: Path,
        run_summary: dict[str, Any],
        dataset: dict[str, Any] | None,
        base_model: str,
        now: datetime,
    ) -> dict[str, Any]:
        """Register a trained adapter as a new candidate version and return it.

        Copies `adapter_src` (the trainer's `<out>/adapter/`) into `models/<vN>/adapter/`, and the run's
        `loss.jsonl` and `summary.json` (next to `adapter_src`) into `models/<vN>/`; writes the checksum
        manifest. The parent is the current champion (None: the base model). `dataset` is the curator's
        datasets row (dataset_id, content_hash, format, heldout_path), or None. Idempotent per `run_id`:
        registering the same run again returns the version it already has.
        """
        existing = self.store.conn.execute("SELECT version FROM models WHERE run_id=?", (run_id,)).fetchone()
        if existing is not None:
            found = self.get(existing[0])
            assert found is not None
            return found
        if not (adapter_src / "adapter_config.json").is_file():
            raise RegistryError(f"{adapter_src} is not a trained adapter (no adapter_config.json)")
        models = self.settings.models_dir
        models.mkdir(parents=True, exist_ok=True)
        # Copy into a private staging directory first: a version directory only appears complete.
        staging = models / f".staging-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(adapter_src, staging / "adapter")
            for name in ("loss.jsonl", "summary.json"):
                if (adapter_src.parent / name).is_file():
                    shutil.copy2(adapter_src.parent / name, staging / name)
            manifest = adapter_manifest(staging / "adapter")
            (staging / MANIFEST_FILE).write_text(manifest, encoding="utf-8")
            digest = hashlib.sha256(manifest.encode("utf-8")).hexdigest()
            with self.store.transaction() as conn:
                seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM models").fetchone()[0])
                version = version_name(seq)
                target = models / version
                if target.exists():  # left by a crash between rename and commit: the row never existed
                    shutil.rmtree(target)
                parent = champion_version(conn)
                conn.execute(
                    "INSERT INTO models(version, seq, parent, run_id, base_model, dataset_id, dataset_hash,"
                    " dataset_format, heldout_path, spec_hash, backend, packages, adapter_path, adapter_sha256,"
                    " status, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        version, seq, parent, run_id, base_model,
                        (dataset or {}).get("dataset_id"),
                        (dataset or {}).get("content_hash") or run_summary.get("dataset_sha256"),
                        (dataset or {}).get("format") or (run_summary.get("spec") or {}).get("format"),
                        (dataset or {}).get("heldout_path") or (run_summary.get("spec") or {}).get("heldout_path"),
                        run_summary.get("spec_hash"), run_summary.get("backend"),
                        json.dumps(run_summary.get("versions") or {}),
                        str(target / "adapter"), digest, "candidate", iso(now),
                    ),
                )
                self._history(version, "registered", f"trained by {run_id}", now)
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        added = self.get(version)
        assert added is not None
        return added

    def record_verdict(self, version: str, verdict: Verdict, now: datetime, *, run_id: str | None = None) -> dict[str, Any]:
        """Store the arena's verdict (a rejected version becomes `rejected`), write `metrics.json`, and
        queue `academy.evaluation.finished` in the same transaction. Returns the event payload."""
        row = self.get(version)
        if row is None:
            raise RegistryError(f"no version {version} in the registry")
        event_id = f"eval-{version}-{uuid.uuid4().hex[:8]}"
        event = events.envelope("academy.evaluation.finished", event_id, now,
                                {"run_id": run_id or row["run_id"], "version": version, **verdict.to_event()})
        with self.store.transaction() as conn:
            status = row["status"] if verdict.promote or row["status"] == "champion" else "rejected"
            conn.execute(
                "UPDATE models SET metrics=?, verdict=?, status=?, evaluated_at=? WHERE version=?",
                (json.dumps(verdict.metrics), json.dumps(verdict.to_event()), status, iso(now), version),
            )
            self._history(version, "evaluated", ("promote: " if verdict.promote else "reject: ")
                          + "; ".join(verdict.reasons), now)
            events.enqueue(self.store, event, now)
        metrics_path = self.version_dir(version) / "metrics.json"
        if metrics_path.parent.is_dir():
            from academyd.files import atomic_write_json

            atomic_write_json(metrics_path, verdict.to_event())
        return event.payload

    def _history(self, version: str, action: str, reason: str, now: datetime) -> None:
        self.store.conn.execute(
            "INSERT INTO model_history(version, action, reason, at) VALUES (?,?,?,?)",
            (version, action, reason, iso(now)),
        )
