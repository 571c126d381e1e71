"""The model registry: every adapter version (v1, v2, ...) with its genealogy, files and verdict.

A version is born a `candidate` when a training run's adapter is registered (`Registry.add_candidate`); the
arena's verdict makes it `rejected` or leaves it a candidate for promotion (`record_verdict`);
`academyd.champion.moves` makes one `champion` (the previous champion becomes `retired`) and moves the
`champion` alias; a rollback marks the champion `rejected` and brings its parent back.

Files of a version live in `<data>/models/<vN>/`: `adapter/` (the adapter as the trainer wrote it,
tokenizer included), `adapter.sha256sum`, `summary.json`, `loss.jsonl`, and after evaluation
`metrics.json`; promotion adds `Modelfile` and `adapter.gguf`.

`adapter_sha256` is the sha256 of the manifest `adapter.sha256sum`: one line `<sha256 of file>  <path>` per
file under `adapter/` (paths relative to it, '/'-separated, sorted, `sha256sum` format, '\\n' line ends).
So it covers the weights, the adapter config and the tokenizer, and anyone can check a copy with
`cd adapter && sha256sum -c ../adapter.sha256sum` and `sha256sum ../adapter.sha256sum`.

The rows are academyd.store.models'. Readers that must not write (the CLI) open the store read-only
(`connect_readonly`) and read it (`list_versions`, `get_version`); `Registry` is the daemon's.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from academyd import events
from academyd.files import sha256_file
from academyd.settings import Settings
from academyd.store import Store
from schemas.models import version_name

if TYPE_CHECKING:
    from academyd.arena import Verdict

STATUSES = ("candidate", "champion", "retired", "rejected")
MANIFEST_FILE = "adapter.sha256sum"


class RegistryError(Exception):
    """The registry cannot do what was asked; the message says why and what to do."""


# ---------------------------------------------------------------- checksums


SERVING_COPIES = ("adapter.gguf", ".adapter.gguf.tmp")
"""Files the follower's `venom` target places at the top of `adapter/` (Venom deploys only a GGUF inside it): a
copy of `<version>/adapter.gguf`, which has its own hash (gguf_sha256). Left out of the manifest, so that
adapter_sha256 always means the trained adapter's files, installed for Venom or not."""


def adapter_manifest(adapter_dir: Path) -> str:
    """The `sha256sum`-format manifest of every file under `adapter_dir` (sorted by relative path), but the
    serving copies (SERVING_COPIES)."""
    if not adapter_dir.is_dir():
        raise RegistryError(f"adapter directory {adapter_dir} does not exist")
    lines = []
    for path in sorted(p for p in adapter_dir.rglob("*")
                       if p.is_file() and p.relative_to(adapter_dir).as_posix() not in SERVING_COPIES):
        rel = path.relative_to(adapter_dir).as_posix()
        lines.append(f"{sha256_file(path)}  {rel}\n")
    if not lines:
        raise RegistryError(f"adapter directory {adapter_dir} is empty")
    return "".join(lines)


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 (hex) of `adapter_manifest(adapter_dir)`: the identity of an adapter's files."""
    return hashlib.sha256(adapter_manifest(adapter_dir).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- reading (no writes)


def connect_readonly(db_path: Path) -> Store:
    """The daemon's database opened read-only (for the CLI); RegistryError if there is none (or no registry)."""
    if not db_path.is_file():
        raise RegistryError(f"no database at {db_path}: start the daemon once (`academyd run`) or pass --data-dir")
    store = Store.open_readonly(db_path)
    if not store.has_table("models"):
        store.close()
        raise RegistryError(f"{db_path} has no model registry yet: run the daemon of this version once to migrate it")
    return store


# ---------------------------------------------------------------- the registry


class Registry:
    """Versions in the daemon's store. Synchronous (short SQLite calls and local file copies)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    # ------------------------------------------------------------ reading

    def champion(self) -> dict[str, Any] | None:
        """The version the `champion` alias points at, or None (Venom runs the base model)."""
        v = self.store.champion_version()
        return None if v is None else self.get(v)

    def get(self, version: str) -> dict[str, Any] | None:
        """One version as a dict (JSON columns decoded, `history` added), or None."""
        return self.store.get_version(version)

    def list(self) -> list[dict[str, Any]]:
        """Every version, oldest first."""
        return self.store.list_versions()

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
        existing = self.store.version_of_run(run_id)
        if existing is not None:
            found = self.get(existing)
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
            with self.store.transaction():
                seq = self.store.next_model_seq()
                version = version_name(seq)
                target = models / version
                if target.exists():  # left by a crash between rename and commit: the row never existed
                    shutil.rmtree(target)
                self.store.insert_model(
                    version=version, seq=seq, parent=self.store.champion_version(), run_id=run_id,
                    base_model=base_model,
                    dataset_id=(dataset or {}).get("dataset_id"),
                    dataset_hash=(dataset or {}).get("content_hash") or run_summary.get("dataset_sha256"),
                    dataset_format=(dataset or {}).get("format") or (run_summary.get("spec") or {}).get("format"),
                    heldout_path=((dataset or {}).get("heldout_path")
                                  or (run_summary.get("spec") or {}).get("heldout_path")),
                    spec_hash=run_summary.get("spec_hash"), backend=run_summary.get("backend"),
                    packages=run_summary.get("versions") or {},
                    adapter_path=str(target / "adapter"), adapter_sha256=digest, now=now,
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
        """Store the arena's verdict (a rejected version becomes `rejected`) and queue
        `academy.evaluation.finished` in the same transaction. Returns the event payload. Database work only:
        the file beside the adapter is `write_metrics`'s (file I/O, which an async caller runs in a thread)."""
        row = self.get(version)
        if row is None:
            raise RegistryError(f"no version {version} in the registry")
        event_id = f"eval-{version}-{uuid.uuid4().hex[:8]}"
        event = events.envelope("academy.evaluation.finished", event_id, now,
                                {"run_id": run_id or row["run_id"], "version": version, **verdict.to_event()})
        with self.store.transaction():
            status = row["status"] if verdict.promote or row["status"] == "champion" else "rejected"
            self.store.set_model_evaluation(version, metrics=verdict.metrics, verdict=verdict.to_event(),
                                            status=status, now=now)
            self._history(version, "evaluated", ("promote: " if verdict.promote else "reject: ")
                          + "; ".join(verdict.reasons), now)
            events.enqueue(self.store, event, now)
        return event.payload

    def write_metrics(self, version: str, verdict: Verdict) -> Path | None:
        """Write the verdict as `metrics.json` in the version's directory (durably, atomically); None when the
        version has no directory. The database is the record; this file is for people and tools reading the
        models directory."""
        metrics_path = self.version_dir(version) / "metrics.json"
        if not metrics_path.parent.is_dir():
            return None
        from academyd.files import atomic_write_json

        atomic_write_json(metrics_path, verdict.to_event())
        return metrics_path

    def _history(self, version: str, action: str, reason: str, now: datetime) -> None:
        self.store.add_model_history(version, action, reason, now)
