"""academyd.events: the one builder of outbound envelopes. Every outbound subject's envelope validates
against schemas.models; an invalid one is refused with the field named before it reaches the outbox, and
the caller's transaction (the state change it announces) rolls back with it. Real SQLite."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime
from pathlib import Path

from fixtures.source import parse_source
from typing import Any

import pytest

from academyd import events
from academyd.store import Store
from schemas.models import OUTBOUND

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]

DEPLOY = {"source_event_id": "promoted-v1-abc", "source_subject": "model.promoted", "version": "v1",
          "target": "llamacpp", "runtime": "http://127.0.0.1:8080", "serving": "v1", "previous": None}
# One real-shaped body per outbound subject (what the daemon's builders pass).
BODIES: dict[str, dict[str, Any]] = {
    "academy.training.requested": {"run_id": "run-1", "reason": "threshold", "forced": False, "new_lessons": 120},
    "academy.dataset.built": {"dataset_id": "ds-1", "run_id": "run-1", "format": "chat", "path": "/d/train.jsonl",
                              "heldout_path": "/d/heldout.jsonl", "manifest_path": "/d/manifest.json",
                              "content_hash": "ab" * 32, "examples": 100, "heldout": 20},
    "academy.training.started": {"run_id": "run-1", "habitat": "process", "dataset_id": "ds-1", "spec_hash": "x"},
    "academy.training.progress": {"run_id": "run-1", "step": 3, "total_steps": 10, "loss": 1.5, "eta_s": 4.0},
    "academy.training.finished": {"run_id": "run-1", "version": "v1", "adapter_path": "/m/v1/adapter",
                                  "backend": "cpu", "final_loss": 1.2, "duration_s": 60.0},
    "academy.training.failed": {"run_id": "run-1", "reason": "training failed", "retry_at": NOW.isoformat()},
    "academy.evaluation.finished": {"run_id": "run-1", "version": "v1", "champion": None, "verdict": "promote",
                                    "reasons": ["better"], "metrics": {}},
    "model.promoted": {"version": "v1", "parent_version": None, "base_model": "/b/base.gguf",
                       "adapter_path": "/m/v1/adapter", "adapter_sha256": "cd" * 32,
                       "modelfile_path": "/m/v1/Modelfile", "ollama_model": "venom-adapter-v1", "reason": "better",
                       "active_adapter_path": "/d/active_adapter.json"},
    "model.rolled_back": {"from_version": "v2", "to_version": "v1", "reason": "task success dropped"},
    "model.deployed": {**DEPLOY, "noop": False},
    "model.deploy_failed": {**DEPLOY, "serving": None, "reason": "probe_failed", "detail": "no answer"},
}


def test_every_outbound_subject_has_a_body_here() -> None:
    assert set(BODIES) == set(OUTBOUND), "a subject was added to OUTBOUND: give it a body in BODIES"


@pytest.mark.parametrize("subject", sorted(BODIES))
def test_every_outbound_envelope_validates(subject: str) -> None:
    ev = events.envelope(subject, f"{subject}-1", NOW, BODIES[subject])
    assert ev.subject == subject and ev.msg_id == ev.event_id == f"{subject}-1"
    assert list(ev.payload)[:3] == ["schema_version", "event_id", "at"]
    assert ev.payload["schema_version"] == 1 and ev.payload["at"] == "2026-11-25T12:00:00+00:00"
    OUTBOUND[subject].model_validate(ev.payload)
    assert events.envelope(subject, "x", NOW, BODIES[subject], msg_id="m-1").msg_id == "m-1"


@pytest.mark.parametrize("subject", sorted(BODIES))
def test_a_body_missing_a_required_field_is_refused_with_the_field_named(subject: str) -> None:
    model = OUTBOUND[subject]
    required = [n for n, f in model.model_fields.items() if f.is_required() and n not in events.ENVELOPE_FIELDS]
    assert required, subject
    body = {k: v for k, v in BODIES[subject].items() if k != required[0]}
    with pytest.raises(events.EventRefused, match=rf"{subject} bad-1 .*{required[0]}: Field required"):
        events.envelope(subject, "bad-1", NOW, body)


def test_unknown_subjects_bad_ids_and_envelope_fields_in_the_body_are_refused() -> None:
    with pytest.raises(events.EventRefused, match="not an outbound subject"):
        events.envelope("lesson.created", "e-1", NOW, {})
    with pytest.raises(events.EventRefused, match="event_id"):
        events.envelope("model.rolled_back", "has spaces", NOW, BODIES["model.rolled_back"])
    with pytest.raises(events.EventRefused, match="envelope fields .*at"):
        events.envelope("model.rolled_back", "e-1", NOW, {**BODIES["model.rolled_back"], "at": "yesterday"})
    with pytest.raises(events.EventRefused, match="verdict"):
        events.envelope("academy.evaluation.finished", "e-1", NOW,
                        {**BODIES["academy.evaluation.finished"], "verdict": "maybe"})


def test_a_refused_event_never_reaches_the_outbox_and_rolls_its_transaction_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "academy.db")
    try:
        outbox = events.Outbox(store)
        with store.transaction():
            outbox.emit("model.rolled_back", "ok-1", NOW, BODIES["model.rolled_back"])
        with pytest.raises(events.EventRefused, match="to_version|from_version"):
            with store.transaction():
                # the state change the event would announce, then an event off the contract
                store.record_dlq("lesson.created", "test", "a row in the same transaction", event_id="dlq-1",
                                 stream_seq=1, excerpt="", now=NOW)
                outbox.emit("model.rolled_back", "bad-1", NOW, {"reason": "no versions"})
        rows = store.conn.execute("SELECT msg_id, subject, payload FROM outbox").fetchall()
        assert [(r["msg_id"], r["subject"]) for r in rows] == [("ok-1", "model.rolled_back")]
        assert json.loads(rows[0]["payload"])["event_id"] == "ok-1"
        assert store.dlq_count() == 0  # rolled back with it
        # The store's own event (a requested run) goes through the same builder.
        run_id = store.create_run(reason="test", forced=True, new_lessons=0, now=NOW)
        payload = json.loads(store.scalar("SELECT payload FROM outbox WHERE msg_id=?", (run_id,)))
        OUTBOUND["academy.training.requested"].model_validate(payload)
    finally:
        store.close()


def test_nothing_but_events_queues_an_outbox_row_or_writes_an_envelope_by_hand() -> None:
    """The seam holds: no module of the daemon calls Store.outbox_add or builds an outbound envelope dict."""
    offenders = []
    for path in sorted((ROOT / "academyd").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("academyd/events.py", "academyd/store/outbox.py"):
            continue
        tree = parse_source(path, rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "outbox_add":
                offenders.append(f"{rel}:{node.lineno}: outbox_add")
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                # academy.jobs.* (habitat/nats.py) is the worker protocol, not an outbound subject
                if {"schema_version", "event_id"} <= keys:
                    offenders.append(f"{rel}:{node.lineno}: an envelope built by hand")
    assert offenders == [], "use academyd.events: " + ", ".join(offenders)
