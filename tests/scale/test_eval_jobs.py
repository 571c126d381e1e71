"""Evaluation jobs on workers (#22, arena.where = worker): the arena's measurement runs on an `academyd worker`
(a real process with its own work directory, on a real nats-server), through the same work queue, lease
and object store as a training job; the daemon's gate decides on what comes back.

The heavy test judges one real adapter twice with the daemon's own arena (`academyd.arena.contest.evaluate`):
locally (the trainer-env subprocess on the daemon's host) and as a worker job, on SmolLM2-135M-Instruct
with the served artifact measured in real llama.cpp, on a dataset the curator built (held-out, checks and
manifest as the pipeline has them). The adapter (`one_answer` of tests/fixtures/build_gate_adapters.py), its
dataset and its local verdict come from tests/fixtures/gate_real.py, made once per session and shared with
tests/arena/test_gate_real.py. The first worker that takes the job is SIGKILLed while it measures: its
measurement process must end by itself and the second worker must take the job over, as for training.
Both verdicts, the served agreement and the measurement's numbers must be the same.

Measured (this shared 2-core VM, load ~8, when the test still trained and judged its own adapter): 36.5
minutes in all (the adapter's training most of it); the local measurement 402 s, the worker job back 602 s
after the kill, the killed worker's measurement gone in 0.6 s, served agreement 0.9788 both ways.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from academyd.arena.contest import evaluate
from academyd.settings import load_settings
from academyd.worker.protocol import ArtifactRef, EvalJob, EvalOutcome, JobMessage, Lease, WireError, decode_job
from fixtures.gate_real import ARENA, GateReal

HERE = Path(__file__).resolve().parent
ACK_WAIT = 10.0  # heartbeat 2.5 s; a SIGKILLed worker's job moves after 10 s + 7.5 s of lease silence
SHA = "a" * 64


def ref(job: str, what: str) -> dict[str, Any]:
    return {"name": f"runs/{job}/{what}", "sha256": SHA, "size": 3}


OPTIONS = {"format": "alpaca", "render": "chat", "runtime": "llamacpp", "serve": "adapter", "generation_sample": 2,
           "general_sample": 4, "answer_sample": 64, "max_new_tokens": 64, "max_length": None, "seed": 0,
           "cpu_threads": 2, "time_limit_s": 3600.0}


def test_an_evaluation_job_is_a_job_of_its_own_kind_on_the_same_wire() -> None:
    job = "run-1-arena-0123456789abcdef"
    inputs = {"candidate": ref(job, "candidate.tar"), "heldout": ref(job, "heldout.jsonl"),
              "general": ref(job, "general.jsonl")}
    body = EvalJob.build(kind="evaluate", run_id=job, base_model="smollm2", inputs=inputs, arena=OPTIONS,
                         requires_gpu=True).encode()
    got = decode_job(body)
    assert isinstance(got, EvalJob) and got.arena.cpu_threads == 2
    got.check_subject(f"academy.jobs.train.gpu.{job}")
    with pytest.raises(WireError, match="subject_mismatch"):
        got.check_subject(f"academy.jobs.train.any.{job}")
    # An input that is another job's, or an option nobody understands, is never sent nor run.
    with pytest.raises(WireError, match="inputs.candidate is not an artifact of job"):
        EvalJob.build(kind="evaluate", run_id=job, base_model="b", arena=OPTIONS, requires_gpu=False,
                      inputs={**inputs, "candidate": ref("run-2", "candidate.tar")})
    raw = json.loads(body)
    raw["arena"]["temperature"] = 1.0
    with pytest.raises(WireError, match="temperature"):
        decode_job(json.dumps(raw).encode())
    # A message without a kind is a training job, read as before.
    with pytest.raises(WireError) as err:
        decode_job(json.dumps({"schema_version": 1, "run_id": "r"}).encode())
    assert "JobMessage" in str(err.value)
    # The lease carries an evaluation's result in `evaluation`, never as a training result: a training job's
    # lease that ends "succeeded" with an evaluation has no adapter, and the nats habitat registers nothing.
    held = Lease.build(run_id=job, state="training", worker="w1", attempt=1)
    done = held.changed(state="succeeded", evaluation=EvalOutcome(
        measurement=ArtifactRef(**ref(job, "measure.json")), arena_dir=ArtifactRef(**ref(job, "arena.tar")),
        out_dir="/w/jobs/x/arena"))
    assert Lease.decode(done.encode()).result is None
    with pytest.raises(WireError, match="not both"):
        done.changed(result={"adapter": ref(job, "adapter.tar"), "adapter_sha256": SHA,
                             "summary": ref(job, "summary.json"), "summary_inline": {}})
    assert JobMessage.model_fields["kind"].default == "train"


# ---------------------------------------------------------------- the real arena, local and on a worker


def measure_processes(marker: str) -> list[int]:
    """Pids of `academyd.arena.measure` processes whose command line names `marker` (a worker's directory)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"academyd.arena.measure" in cmd and marker.encode() in cmd and state != "Z":
            out.append(int(d.name))
    return out


def relative_close(a: float | None, b: float | None, tol: float = 1e-4) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=tol, abs_tol=1e-6)


def losses(rows: list[dict[str, Any]]) -> list[float]:
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.timeout(5400)
async def test_a_worker_s_measurement_gives_the_local_verdict_and_served_agreement(
        tmp_path: Path, nats_server: Any, start_worker: Any, base_cache: Path, gate_real: GateReal) -> None:
    # The adapter, its dataset and its local verdict: tests/fixtures/gate_real.py (made once per session and
    # judged there by the same `evaluate` on the daemon's host, with the same arena options).
    settings = load_settings(None, data_dir=tmp_path / "data", nats={"url": nats_server.url},
                             workers={"ack_wait_s": ACK_WAIT}, arena=ARENA)
    ds = gate_real.dataset
    adapter = gate_real.adapter("one_answer")
    local = gate_real.verdicts["one_answer"]
    local_dir = gate_real.out["one_answer"]

    # Two workers ("hosts").
    env = {"ACADEMY_WORKERS__ACK_WAIT_S": str(ACK_WAIT), "ACADEMY_BASE_CACHE": str(base_cache)}
    w1 = start_worker(nats_server.url, "w1", "--gpu", "none", **env)
    w2 = start_worker(nats_server.url, "w2", "--gpu", "none", **env)

    async def judge(where: str, out: Path, nc: Any = None) -> Any:
        s = settings.model_copy(deep=True)
        s.arena.where = where
        return await evaluate(s, candidate_adapter=adapter, champion_adapter=None,
                              base_model=settings.training.base_model, heldout_path=Path(ds.heldout_path),
                              format=ds.format, out_dir=out, nc=nc, run_id="run-eval-1")

    nc = await nats.connect(nats_server.url)
    try:
        remote_task = asyncio.create_task(judge("worker", tmp_path / "remote", nc))
        # The worker that takes the job is SIGKILLed while it measures (its host stays up).
        first = None
        deadline = time.monotonic() + 600
        while first is None and time.monotonic() < deadline and not remote_task.done():
            for w in (w1, w2):
                if any(e.get("event") == "measurement_started" for e in w.events()):
                    first = w
            await asyncio.sleep(0.5)
        assert first is not None, (remote_task.done() and remote_task.exception(), w1.log[-3000:], w2.log[-3000:])
        other = w2 if first is w1 else w1
        await asyncio.sleep(5)  # into the measurement (the model loads)
        assert measure_processes(str(first.root)), "the first worker's measurement is not running"
        first.kill()
        killed = time.monotonic()
        while measure_processes(str(first.root)) and time.monotonic() - killed < 30:
            await asyncio.sleep(0.2)
        orphan_s = time.monotonic() - killed
        assert not measure_processes(str(first.root)), "the killed worker's measurement outlived it"
        t1 = time.monotonic()
        remote = await asyncio.wait_for(remote_task, 2400)
        remote_s = time.monotonic() - t1
    finally:
        await nc.close()

    measure_local = json.loads((local_dir / "measure.json").read_text())
    measure_remote = json.loads((tmp_path / "remote" / "measure.json").read_text())
    by = measure_remote["measured_by"]
    assert by["worker"] == other.name and by["attempt"] == 2, by
    assert any(e.get("event") == "evaluation_succeeded" for e in other.events()), other.log[-3000:]

    # The verdict: the same decision on the same rules, for the same reasons.
    assert remote.promote == local.promote, (remote.reasons, local.reasons)
    assert remote.rules == local.rules, (remote.rules, local.rules)
    assert remote.reasons == local.reasons
    # The served agreement (llama.cpp against the trainer), measured on the worker, as here.
    agree_l, agree_r = local.metrics["served"]["agreement"], remote.metrics["served"]["agreement"]
    assert agree_r["n"] == agree_l["n"] > 0 and agree_r["exact_text"] == agree_l["exact_text"]
    assert relative_close(agree_r["mean"], agree_l["mean"], 1e-9), (agree_r, agree_l)
    assert agree_l["mean"] >= settings.arena.served_agreement_min, agree_l
    # The numbers behind it, within float tolerance: held-out and general losses, in torch and llama.cpp.
    for part in ("heldout", "general"):
        for side, rows in measure_local[part].items():
            assert all(relative_close(a, b) for a, b in zip(losses(rows), losses(measure_remote[part][side]),
                                                            strict=True)), (part, side)
        for side, rows in measure_local["runtime"][part].items():
            assert all(relative_close(a, b) for a, b in zip(
                losses(rows), losses(measure_remote["runtime"][part][side]), strict=True)), ("runtime", part, side)
    assert measure_remote["answers"] == measure_local["answers"]
    # The served artifact came back where the promotion looks for it, as exported on the worker: the same bytes.
    gguf = tmp_path / "remote" / "candidate.gguf"
    assert gguf.is_file() and gguf.read_bytes() == (local_dir / "candidate.gguf").read_bytes()
    assert measure_remote["runtime"]["probes_path"] == str(tmp_path / "remote" / "probes.json")
    assert Path(measure_remote["runtime"]["probes_path"]).is_file()
    print(f"\nas a worker job (SIGKILL of {first.name}, takeover by "
          f"{other.name}) {remote_s:.0f} s after the kill; the killed worker's measurement gone in {orphan_s:.1f} s; "
          f"served agreement {agree_l['mean']:.4f} (local) {agree_r['mean']:.4f} (worker); promote {local.promote}")


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_the_pipeline_judges_a_worker_trained_run_on_a_worker(
        nats_server: Any, start_daemon: Any, start_worker: Any, tiny_base_model: Path, trainer_python: Path,
        tmp_path: Path) -> None:
    """The daemon's own loop with arena.where = worker: the run trains on the worker, its measurement is a
    job for the same worker (the daemon's reference to the base mapped to the worker's copy), and the
    daemon's gate decides, registers the verdict and promotes, as with a local measurement."""
    from academyd.registry import Registry
    from fixtures.nats import wait_for
    from scale.test_workers import daemon_settings, lessons_in, train, worker

    url = nats_server.url
    settings = daemon_settings(url, tmp_path / "daemon" / "data", tiny_base_model, trainer_python, autorun=False,
                               habitat="process")
    settings.arena.where = "worker"
    d = await start_daemon(settings)
    await lessons_in(d, url)
    w1 = worker(start_worker, tmp_path, tiny_base_model, url, "w1")
    run_id = await train(d)
    store = d.app.store
    await wait_for(lambda: store.get_run(run_id)["state"] in ("succeeded", "failed", "refused"), timeout=1500,
                   interval=0.5)
    run = store.get_run(run_id)
    assert run["state"] == "succeeded", (run, w1.log[-3000:])
    judged = [e for e in w1.events() if e.get("event") == "evaluation_succeeded"]
    assert len(judged) == 1 and judged[0]["run_id"].startswith(f"{run_id}-arena-"), judged
    arena_dir = settings.models_dir / run["version"] / "arena"
    measured = json.loads((arena_dir / "measure.json").read_text())
    assert measured["measured_by"]["worker"] == "w1" and measured["measured_by"]["job"] == judged[0]["run_id"]
    assert (arena_dir / "verdict.json").is_file()
    registry = Registry(store, settings)
    assert registry.champion()["version"] == run["version"]  # the tiny run is promoted here as when judged locally
