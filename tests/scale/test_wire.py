"""The worker wire under hostile input, on a real nats-server with a real `academyd worker` process and the
real trainer: job messages that are not jobs are rejected one by one (terminated, dead-lettered, the reason
logged) while the worker goes on and trains the good one; forwarded events that are not events are dropped
by the daemon's habitat; a lease record forged by a third party is trusted by neither side.

The daemon's side is academyd.habitat.nats.NatsHabitat in this process, on the streams the daemon's bus
creates (academyd.bus.Bus.ensure_streams: the DLQ among them).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from academyd.bus import Bus
from academyd.habitat.base import JobStatus, TrainingJob
from academyd.habitat.nats import NatsHabitat
from academyd.settings import load_settings
from academyd.trainer import spec as S
from academyd.worker.protocol import JobMessage, events_subject, job_subject

ACK_WAIT = 8.0  # heartbeat 2 s; a taker waits out 6 s of lease silence


@pytest.fixture
async def daemon_side(nats_server: Any, tmp_path: Path) -> AsyncIterator[tuple[Any, NatsHabitat, Any]]:
    settings = load_settings(None, data_dir=tmp_path / "daemon", log_level="warning",
                             nats={"url": nats_server.url}, workers={"ack_wait_s": ACK_WAIT})
    bus = Bus(settings.nats)
    await bus.connect(nats_server.url)
    await bus.ensure_streams()
    habitat = NatsHabitat(settings, bus.nc, poll_s=0.2)
    await habitat.wire()  # the jobs stream, its consumers and the buckets, as at the daemon's first job
    yield settings, habitat, bus
    await bus.close()


def start_cpu_worker(start_worker: Any, url: str) -> Any:
    return start_worker(url, "w1", "--gpu", "none", "--cpu-threads", "1", ACADEMY_WORKERS__ACK_WAIT_S=str(ACK_WAIT))


def job_for(settings: Any, make_spec: Any, run_id: str) -> TrainingJob:
    spec = make_spec(settings.runs_dir / run_id, run_id=run_id, max_steps=10)
    return TrainingJob(spec=spec, run_id=run_id, time_limit_s=600)


def logged(w: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in w.events() if e.get("event") == event]


async def test_hostile_job_messages_are_rejected_each_alone_and_the_good_one_trains(
    daemon_side, nats_server, start_worker, make_spec, tmp_path
) -> None:
    settings, habitat, bus = daemon_side
    js = bus.js
    w1 = start_cpu_worker(start_worker, nats_server.url)
    # A well-formed job to spoil, one field at a time.
    spec = make_spec(tmp_path / "decoy", run_id="decoy").to_dict()
    good = {"schema_version": 1, "run_id": "decoy", "spec": spec, "spec_hash": S.spec_hash(S.TrainSpec.from_dict(spec)),
            "base_model": spec["base_model"], "requires_gpu": False,
            "inputs": {"dataset": {"name": "runs/decoy/dataset.jsonl", "sha256": "0" * 64, "size": 1}}}
    JobMessage.decode(json.dumps(good).encode()).check_subject(job_subject("decoy", False))  # the baseline is valid

    def spoiled(run_id: str, **changes: Any) -> bytes:
        body = {**good, "run_id": run_id, "spec": {**spec, "run_id": run_id},
                "inputs": {"dataset": {**good["inputs"]["dataset"], "name": f"runs/{run_id}/dataset.jsonl"}}}
        return json.dumps({**body, **changes}).encode()

    hostile = {  # subject token -> (body, what the worker must say)
        "bad-json": (b"this is not json {", "Invalid JSON"),
        "bad-missing": (json.dumps({"schema_version": 1, "run_id": "bad-missing"}).encode(), "spec: Field required"),
        "bad-types": (spoiled("bad-types", requires_gpu="no", time_limit_s="soon"), "requires_gpu"),
        "bad-huge": (spoiled("bad-huge", base_model="b" * 400_000), "at most 262144"),
        "bad-long": (spoiled("bad-long", base_model="b" * 5000), "base_model: String should have at most 4096"),
        "bad-path": (spoiled("../x"), "run_id: String should match pattern"),
        "bad-version": (spoiled("bad-version", schema_version=2), "schema_version 2 is not understood"),
        "bad-subject": (spoiled("someone-else"), "arrived on academy.jobs.train.any.bad-subject"),
    }
    for token, (body, _) in hostile.items():
        await js.publish(job_subject(token, False), body)
    job = job_for(settings, make_spec, "run-good")
    handle = await habitat.start(job)
    # Events that are not a worker's, on the good run's subject: the habitat drops each and goes on.
    junk = [b"not json", json.dumps({"schema_version": 1, "run_id": "run-good", "worker": "w1", "attempt": 1,
                                     "event": {"type": "progress", "time": 1.0, "step": "many"}}).encode(),
            json.dumps({"schema_version": 1, "run_id": "run-other", "worker": "w1", "attempt": 1,
                        "event": {"type": "progress", "time": 1.0, "step": 999}}).encode(),
            json.dumps({"schema_version": 1, "run_id": "run-good", "worker": "w1", "attempt": 1,
                        "event": {"type": "start", "time": 1.0, "pad": "x" * 100_000}}).encode()]
    for data in junk:
        await js.publish(events_subject("run-good", "w1"), data)

    with capture_logs() as logs:
        seen = [ev async for ev in habitat.progress(handle)]
    result = await habitat.result(handle)
    assert result.status is JobStatus.SUCCEEDED, (result, w1.log[-3000:])
    assert (Path(result.adapter_path) / "adapter_config.json").is_file()
    assert seen[-1]["type"] == S.EVENT_DONE
    progress = [e for e in seen if e["type"] == S.EVENT_PROGRESS]
    assert progress and all(isinstance(e["step"], int) and e["step"] <= 10 and e["worker"] == "w1" for e in progress)
    assert not any(e.get("pad") for e in seen)
    dropped = [e for e in logs if e["event"] == "event_dropped"]
    assert len(dropped) == len(junk), dropped
    reasons = " | ".join(e["reason"] for e in dropped)
    assert "Invalid JSON" in reasons and "event.step" in reasons and "run-other" in reasons and "too_large" in reasons

    # The worker: each hostile message rejected alone, with its reason, and the good one trained after them.
    rejected = {e["subject"].rsplit(".", 1)[-1]: e for e in logged(w1, "job_rejected")}
    assert set(rejected) == set(hostile), (sorted(rejected), w1.log[-3000:])
    for token, (_, says) in hostile.items():
        assert says in rejected[token]["reason"], (token, rejected[token])
        assert rejected[token]["dead_lettered"] is True
    assert rejected["bad-huge"]["code"] == "too_large" and rejected["bad-subject"]["code"] == "subject_mismatch"
    assert [e["run_id"] for e in logged(w1, "trainer_started")] == ["run-good"]
    assert w1.proc.poll() is None  # still running, ready for the next job
    work = w1.root / "work"
    assert sorted(p.name for p in (work / "jobs").iterdir()) == ["run-good"]
    assert not (work / "x").exists() and not (w1.root / "x").exists()
    # None of them is left in the queue to come back, and each is in the DLQ with why.
    assert (await js.stream_info(settings.workers.jobs_stream)).state.messages == 0
    dlq = await js.stream_info(settings.nats.dlq_stream)
    assert dlq.state.messages == len(hostile)
    letters = [await js.get_msg(settings.nats.dlq_stream, seq) for seq in range(dlq.state.first_seq,
                                                                                  dlq.state.last_seq + 1)]
    by_token = {m.headers["Academy-Original-Subject"].rsplit(".", 1)[-1]: m for m in letters}
    assert set(by_token) == set(hostile)
    assert by_token["bad-json"].headers["Academy-Reason"] == "job_invalid"
    assert by_token["bad-json"].subject == "academy.dlq.academy.jobs.train.any.bad-json"
    assert by_token["bad-huge"].headers["Academy-Truncated"] == str(len(hostile["bad-huge"][0]))
    assert "Invalid JSON" in by_token["bad-json"].headers["Academy-Detail"]

    # A job the worker refused (here: a daemon of a newer version, schema_version 2) does not leave its run
    # waiting for ever: the daemon's habitat finds the dead letter and ends the job failed, with the reason.
    refused = await habitat.reattach("nats:bad-version")
    ends = [ev async for ev in habitat.progress(refused)]
    assert ends[-1]["type"] == S.EVENT_ERROR and "schema_version 2 is not understood" in ends[-1]["reason"], ends
    assert await habitat.status(refused) is JobStatus.FAILED
    res = await habitat.result(refused)
    assert res.status is JobStatus.FAILED and res.error_code == "job_refused", res
    assert res.reason.startswith("a worker refused the job (job_invalid: ") and "schema_version 2" in res.reason, res
    # A run whose job no worker has refused is not touched: the good run's lease is still its worker's.
    assert (await habitat.status(handle)) is JobStatus.SUCCEEDED


async def test_a_lease_forged_by_a_third_party_is_trusted_by_neither_side(
    daemon_side, nats_server, start_worker, make_spec
) -> None:
    """A record claiming the run succeeded (no result, another 'worker'): the daemon does not take the run
    for finished (it dispatches it and keeps waiting), the worker does not ack the job as done; it waits
    the record out as it would a silent holder, takes the lease by compare-and-swap and trains."""
    settings, habitat, _ = daemon_side
    wire = await habitat.wire()
    run_id = "run-forged"
    forged = json.dumps({"schema_version": 1, "run_id": run_id, "state": "succeeded", "worker": "mallory"}).encode()
    rev = await wire.leases.put(f"{run_id}.mallory", forged)
    assert await wire.lease(run_id) == (None, rev)  # there is a record; nothing in it is trusted
    w1 = start_cpu_worker(start_worker, nats_server.url)
    handle = await habitat.start(job_for(settings, make_spec, run_id))
    assert await habitat.status(handle) is JobStatus.RUNNING  # queued, not "succeeded"
    result = await habitat.result(handle)
    assert result.status is JobStatus.SUCCEEDED, (result, w1.log[-3000:])
    assert (Path(result.adapter_path) / "adapter_config.json").is_file()
    untrusted = logged(w1, "lease_record_not_honoured")
    assert untrusted and "a result exactly when the state is succeeded" in untrusted[0]["reason"]
    assert [e["holder"] for e in logged(w1, "lease_wait")] == ["(not a valid lease)"]
    assert not logged(w1, "job_already_finished")
    history = [json.loads(e.value) for e in await wire.leases.history(f"{run_id}.*")]
    assert history[0]["worker"] == "mallory"
    mine = history[1:]
    assert mine and all(h["worker"] == "w1" and h["attempt"] == 1 for h in mine)
    assert mine[-1]["state"] == "succeeded"
