"""The registry on a real SQLite store with real trained adapters."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from academyd.arena import Verdict
from academyd.registry import (
    MANIFEST_FILE,
    Registry,
    RegistryError,
    adapter_sha256,
    connect_readonly,
)
from academyd.settings import Settings
from academyd.store import Store
from fixtures.arena import outbox_rows
from schemas.models import EvaluationFinished

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_add_candidate_copies_files_and_hashes_the_adapter(
    arena_settings: Settings, arena_store: Store, trained_good: Path, tiny_base_model: Path
) -> None:
    reg = Registry(arena_store, arena_settings)
    dataset = {"dataset_id": "ds-1", "content_hash": "abc", "format": "alpaca", "heldout_path": "/h.jsonl"}
    v1 = reg.add_candidate(run_id="run-1", adapter_src=trained_good / "adapter", run_summary=summary(trained_good),
                           dataset=dataset, base_model=str(tiny_base_model), now=NOW)
    assert v1["version"] == "v1" and v1["parent"] is None and v1["status"] == "candidate"
    vdir = arena_settings.models_dir / "v1"
    assert Path(v1["adapter_path"]) == vdir / "adapter"
    assert (vdir / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (trained_good / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (vdir / "loss.jsonl").is_file() and (vdir / "summary.json").is_file()
    # The checksum is the sha256 of a sha256sum manifest that `sha256sum -c` accepts.
    manifest = (vdir / MANIFEST_FILE).read_text()
    assert v1["adapter_sha256"] == hashlib.sha256(manifest.encode()).hexdigest() == adapter_sha256(vdir / "adapter")
    assert "adapter_model.safetensors" in manifest and "adapter_config.json" in manifest
    check = subprocess.run(["sha256sum", "-c", f"../{MANIFEST_FILE}"], cwd=vdir / "adapter", capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert v1["dataset_id"] == "ds-1" and v1["dataset_hash"] == "abc" and v1["dataset_format"] == "alpaca"
    assert v1["spec_hash"] == summary(trained_good)["spec_hash"] and v1["backend"] == "peft"
    assert "torch" in v1["packages"] and "peft" in v1["packages"]
    # Idempotent per run: the same run registered twice is the same version.
    again = reg.add_candidate(run_id="run-1", adapter_src=trained_good / "adapter", run_summary={}, dataset=None,
                              base_model=str(tiny_base_model), now=NOW)
    assert again["version"] == "v1" and len(reg.list()) == 1
    assert not any(p.name.startswith(".staging") for p in arena_settings.models_dir.iterdir())


def test_parent_is_the_champion_and_verdicts_are_events(
    arena_settings: Settings, arena_store: Store, trained_good: Path, trained_noise: Path, tiny_base_model: Path
) -> None:
    reg = Registry(arena_store, arena_settings)
    v1 = reg.add_candidate(run_id="run-1", adapter_src=trained_good / "adapter", run_summary=summary(trained_good),
                           dataset=None, base_model=str(tiny_base_model), now=NOW)
    # Make v1 the champion the way promotion does (promotion itself is tested in test_promotion).
    with arena_store.transaction():
        arena_store.make_champion("v1", {}, NOW)
    assert reg.champion()["version"] == "v1"
    v2 = reg.add_candidate(run_id="run-2", adapter_src=trained_noise / "adapter", run_summary=summary(trained_noise),
                           dataset=None, base_model=str(tiny_base_model), now=NOW)
    assert v2["version"] == "v2" and v2["parent"] == "v1"
    assert v1["adapter_sha256"] != v2["adapter_sha256"]

    verdict = Verdict(promote=False, reasons=["held-out loss worse"], metrics={"heldout": {"candidate_loss": 2.0}},
                      champion="v1", rules={"heldout": False})
    payload = reg.record_verdict("v2", verdict, NOW)
    assert not (arena_settings.models_dir / "v2" / "metrics.json").exists()  # the database only
    assert reg.write_metrics("v2", verdict) == arena_settings.models_dir / "v2" / "metrics.json"
    assert reg.get("v2")["status"] == "rejected"
    assert reg.get("v2")["verdict"]["verdict"] == "reject"
    rows = outbox_rows(arena_store, "academy.evaluation.finished")
    assert len(rows) == 1 and rows[0]["payload"] == payload and rows[0]["msg_id"] == payload["event_id"]
    ev = EvaluationFinished.model_validate(payload)
    assert ev.version == "v2" and ev.champion == "v1" and ev.verdict == "reject" and ev.run_id == "run-2"
    assert json.loads((arena_settings.models_dir / "v2" / "metrics.json").read_text())["verdict"] == "reject"
    history = [h["action"] for h in reg.get("v2")["history"]]
    assert history == ["registered", "evaluated"]

    # The CLI's read-only view sees the same.
    ro = connect_readonly(arena_settings.db_path)
    try:
        assert [v["version"] for v in ro.list_versions()] == ["v1", "v2"]
        assert ro.champion_version() == "v1"
        with pytest.raises(Exception, match="readonly"):
            ro.conn.execute("DELETE FROM models")
    finally:
        ro.close()


def test_bad_inputs_say_what_to_do(arena_settings: Settings, arena_store: Store, tmp_path: Path) -> None:
    reg = Registry(arena_store, arena_settings)
    with pytest.raises(RegistryError, match="not a trained adapter"):
        reg.add_candidate(run_id="r", adapter_src=tmp_path, run_summary={}, dataset=None, base_model="b", now=NOW)
    with pytest.raises(RegistryError, match="no version v7"):
        reg.record_verdict("v7", Verdict(True, [], {}), NOW)
    with pytest.raises(RegistryError, match="start the daemon once"):
        connect_readonly(tmp_path / "nothing.db")
