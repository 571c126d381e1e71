"""The worker wire's models (academyd.worker.protocol), pure: what a peer may send is checked field by field,
and what this side builds is refused before it is sent. No server here: tests/scale/test_wire.py puts the
same messages on a real nats-server and a real worker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from academyd.trainer.spec import TrainSpec, spec_hash
from academyd.worker.protocol import (
    JOB_MAX_BYTES,
    REASON_MAX,
    Advertisement,
    ArtifactRef,
    CancelMessage,
    ForwardedEvent,
    JobMessage,
    Lease,
    WireError,
    clip,
    job_subject,
)

SHA = "ab" * 32


def ref(run_id: str, what: str) -> dict[str, Any]:
    return {"name": f"runs/{run_id}/{what}", "sha256": SHA, "size": 12}


def job_body(run_id: str = "run-20261203-0a1b2c3d", **changes: Any) -> dict[str, Any]:
    spec = TrainSpec.from_dict({"base_model": "/models/base", "dataset_path": "/data/train.jsonl",
                                "heldout_path": "/data/heldout.jsonl", "output_dir": f"/data/runs/{run_id}",
                                "run_id": run_id, "hyperparameters": {"epochs": 2}})
    body = {"schema_version": 1, "run_id": run_id, "spec": spec.to_dict(), "spec_hash": spec_hash(spec),
            "base_model": "/models/base", "inputs": {"dataset": ref(run_id, "dataset.jsonl"),
                                                     "heldout": ref(run_id, "heldout.jsonl")},
            "requires_gpu": False, "time_limit_s": 3600.0, "memory_limit_mb": None}
    body.update(changes)
    return body


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def rejected(model: Any, data: bytes) -> WireError:
    with pytest.raises(WireError) as info:
        model.decode(data)
    return info.value


def test_a_job_the_daemon_builds_is_the_job_a_worker_reads() -> None:
    body = job_body()
    built = JobMessage.build(**{k: v for k, v in body.items() if k != "schema_version"})
    data = built.encode()
    got = JobMessage.decode(data)
    assert got == built and got.train_spec().run_id == body["run_id"]
    got.check_subject(job_subject(body["run_id"], False))
    assert json.loads(data)["schema_version"] == 1


@pytest.mark.parametrize(("data", "code", "says"), [
    (b"this is not json", "invalid", "Invalid JSON"),
    (b"[1, 2]", "invalid", "should be an object"),
    (raw({"schema_version": 1, "run_id": "r-1"}), "invalid", "spec: Field required"),
    (raw(job_body(requires_gpu="no")), "invalid", "requires_gpu: Input should be a valid boolean"),
    (raw(job_body(time_limit_s="soon")), "invalid", "time_limit_s"),
    (raw(job_body(memory_limit_mb=1.5)), "invalid", "memory_limit_mb"),
    (raw(job_body(spec="a spec")), "invalid", "spec: Input should be an object"),
    (raw(job_body(run_id="../x")), "invalid", "run_id: String should match pattern"),
    (raw(job_body(run_id="a.b")), "invalid", "run_id: String should match pattern"),
    (raw(job_body(schema_version=2)), "invalid", "schema_version 2 is not understood"),
    (raw({k: v for k, v in job_body().items() if k != "schema_version"}), "invalid", "schema_version: Field required"),
    (raw(job_body(priority="high")), "invalid", "priority: Extra inputs are not permitted"),
    (raw(job_body(spec_hash="0" * 64)), "invalid", "spec_hash is not the hash of spec"),
    (raw(job_body(base_model="/elsewhere")), "invalid", "base_model is not the spec's"),
    (raw(job_body(base_model="x" * 5000)), "invalid", "base_model: String should have at most 4096"),
    (raw(job_body(inputs={"dataset": ref("run-other", "dataset.jsonl")})), "invalid", "not an artifact of run"),
    (raw(job_body(inputs={"dataset": {**ref("r", "x"), "name": "runs/run-20261203-0a1b2c3d/../../etc"}})),
     "invalid", "inputs.dataset.name"),
    (raw(job_body(inputs={"dataset": {**ref("r", "x"), "sha256": "nope"}})), "invalid", "inputs.dataset.sha256"),
    (raw(job_body(inputs={})), "invalid", "inputs.dataset: Field required"),
    (raw(job_body(spec={**job_body()["spec"], "dataset_path": "relative.jsonl"})), "invalid", "dataset_path"),
    (raw(job_body(time_limit_s=float("nan"))), "invalid", "time_limit_s"),
    (raw(job_body(base_model="x" * (JOB_MAX_BYTES + 1))), "too_large", "at most 262144"),
])
def test_a_hostile_job_message_is_refused_with_the_field_named(data: bytes, code: str, says: str) -> None:
    err = rejected(JobMessage, data)
    assert err.code == code and says in err.detail, err.detail
    assert len(err.detail) < 2000  # the reason names the field, never echoes a huge value


def test_a_job_on_another_run_s_subject_is_refused() -> None:
    job = JobMessage.decode(raw(job_body()))
    for subject in (job_subject("run-other", False), job_subject(job.run_id, True)):
        with pytest.raises(WireError) as info:
            job.check_subject(subject)
        assert info.value.code == "subject_mismatch"


def test_a_malformed_message_is_never_built() -> None:
    body = {k: v for k, v in job_body().items() if k != "schema_version"}
    for bad in ({"run_id": "../x"}, {"requires_gpu": None}, {"inputs": {"dataset": ref("other", "d")}}):
        with pytest.raises(WireError) as info:
            JobMessage.build(**{**body, **bad})
        assert info.value.code == "unsendable"
    with pytest.raises(WireError):
        CancelMessage.build(grace_s=-1)
    with pytest.raises(WireError):
        ForwardedEvent.build(run_id="r-1", worker="w1", attempt=1, event={"type": "progress", "time": 1.0})
    with pytest.raises(WireError):  # built, but over the bytes a receiver takes
        ForwardedEvent.build(run_id="r-1", worker="w1", attempt=1,
                             event={"type": "start", "time": 1.0, "notes": "x" * 70_000}).encode()


def lease(**fields: Any) -> bytes:
    return raw({"schema_version": 1, "run_id": "r-1", **fields})


def test_a_lease_record_is_trusted_only_when_whole() -> None:
    good = {"state": "succeeded", "worker": "w1", "attempt": 1,
            "result": {"adapter": ref("r-1", "adapter.tar"), "adapter_sha256": SHA, "summary": ref("r-1", "summary.json"),
                       "summary_inline": {"backend": "peft", "final_loss": 0.5, "steps": 10}}}
    assert Lease.decode(lease(**good)).result.summary_inline.steps == 10
    for bad, says in [
        ({"state": "succeeded", "worker": "mallory"}, "a result exactly when the state is succeeded"),
        ({**good, "state": "failed"}, "a result exactly when the state is succeeded"),
        ({"state": "training"}, "names its worker and attempt"),
        ({"state": "training", "worker": "w1", "attempt": 1,
          "checkpoint": {"step": 4, "artifact": ref("run-other", "ckpt/4.tar"), "worker": "w1"}}, "not run r-1's"),
        ({**good, "result": {**good["result"], "adapter_sha256": "x"}}, "result.adapter_sha256"),
        ({"state": "done"}, "state: Input should be"),
        ({"state": "failed", "reason": "x" * (REASON_MAX + 1)}, "reason: String should have at most"),
        ({"state": "failed", "owner": "mallory"}, "owner: Extra inputs are not permitted"),
        ({"state": "failed", "attempt": "1"}, "attempt: Input should be a valid integer"),
    ]:
        err = rejected(Lease, lease(**bad))
        assert says in err.detail, (bad, err.detail)
    assert rejected(Lease, b"\xff\xfe garbage").code == "invalid"
    assert rejected(Lease, lease(state="failed", reason="x" * 70_000)).code == "too_large"


def test_a_lease_changes_only_into_another_valid_lease() -> None:
    held = Lease.build(run_id="r-1", worker="w1", state="training", attempt=1)
    assert held.changed(beat=2.5).beat == 2.5
    with pytest.raises(WireError):
        held.changed(state="succeeded")  # no result
    assert len(clip("x" * 10_000)) == REASON_MAX and clip("short") == "short" and clip(None) is None
    assert clip("a" * REASON_MAX + "the end").endswith("the end")


def ad(**fields: Any) -> bytes:
    return raw({"schema_version": 1, "worker": "w1", "host": "gpu-1", "platform": "Linux", "gpu": None,
                "cpu_threads": 8, "trainer": {"torch": "2.13.0"}, "job": None, "at": 1.5, **fields})


def test_an_advertisement_may_say_more_but_not_anything() -> None:
    got = Advertisement.decode(ad(gpu={"name": "H200", "memory_mb": 143_000, "count": 1, "uuid": "GPU-1"},
                                  new_field=True))  # a newer worker saying more is still a worker
    assert got.gpu is not None and got.gpu.name == "H200"
    for bad, says in [({"worker": "w/1"}, "worker: String should match"), ({"cpu_threads": 0}, "cpu_threads"),
                      ({"job": "../x"}, "job: String should match"), ({"gpu": {"name": "x"}}, "gpu.memory_mb"),
                      ({"trainer": {f"p{i}": "1" for i in range(40)}}, "trainer"), ({"schema_version": 2}, "schema_version")]:
        assert says in rejected(Advertisement, ad(**bad)).detail


def event(**fields: Any) -> bytes:
    return raw({"schema_version": 1, "run_id": "r-1", "worker": "w1", "attempt": 1,
                "event": {"type": "progress", "time": 1.0, "step": 3, "loss": 0.5, **fields}})


def test_a_forwarded_event_is_typed_where_the_daemon_reads_it() -> None:
    got = ForwardedEvent.decode(event(tokens_per_s=10, note="kept"))
    assert got.event.model_dump(exclude_unset=True) == {"type": "progress", "time": 1.0, "step": 3, "loss": 0.5,
                                                         "tokens_per_s": 10, "note": "kept"}
    for bad, says in [({"step": "3"}, "event.step"), ({"step": None}, "needs its step"), ({"loss": "low"}, "event.loss"),
                      ({"type": "shell"}, "event.type"), ({"step": -1}, "event.step")]:
        assert says in rejected(ForwardedEvent, event(**bad)).detail
    assert rejected(ForwardedEvent, event(note="x" * 70_000)).code == "too_large"
    assert "Invalid JSON" in rejected(ForwardedEvent, b'{"event": NaN').detail


def test_a_cancel_names_its_grace() -> None:
    assert CancelMessage.decode(CancelMessage.build(grace_s=10).encode()).grace_s == 10.0
    assert rejected(CancelMessage, raw({"grace_s": 10})).code == "invalid"  # no schema_version
    assert rejected(CancelMessage, raw({"schema_version": 1, "grace_s": 1e9})).code == "invalid"


def test_an_artifact_ref_converts_both_ways() -> None:
    r = ArtifactRef.model_validate(ref("r-1", "ckpt/00000004-a1.tar"))
    assert ArtifactRef.of(r.artifact()) == r and r.belongs_to("r-1") and not r.belongs_to("r-10")
