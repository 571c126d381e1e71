"""Trust per worker, on a real nats-server with the embedded server's generated identities (academyd.embedded,
academyd.nats_auth): a second worker identity ("mallory") tries to write the honest worker's lease, record
a result and an end for its job, publish progress for it, upload an artifact over its adapter and purge the
artifact bucket. Each is refused by the server or not honoured by the daemon; nothing from mallory is
registered and the honest worker's job finishes once, with its own adapter.

The first test works on the wire (the daemon's habitat in this process, the honest worker's steps through
the worker's own modules); the second runs the whole loop: the daemon, a real `academyd worker` process as
`worker-honest` training the tiny model, mallory attacking while it trains, one version registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from structlog.testing import capture_logs

from academyd import nats_auth
from academyd.artifacts import put_dir, put_file
from academyd.embedded import EmbeddedServer, free_port
from academyd.habitat.base import JobStatus, TrainingJob
from academyd.habitat.nats import NatsHabitat
from academyd.registry import adapter_sha256
from academyd.settings import load_settings
from academyd.trainer import spec as S
from academyd.worker.lease import HeldLease
from academyd.worker.protocol import (
    Advertisement,
    ArtifactRef,
    ForwardedEvent,
    JobOutcome,
    Lease,
    SummaryInline,
    Timing,
    Wire,
    artifact_name,
    consumer_name,
    events_subject,
)
from tests.fixtures.scale import write_over

ACK_WAIT = 8.0  # heartbeat 2 s; a holder stops after 4 s of silence; fresh for 5 s; a taker waits 6 s


@pytest.fixture
async def embedded(tmp_path: Path) -> Any:
    """The daemon's embedded server with the honest worker's identity; mallory's added while it runs."""
    nats_dir = tmp_path / "data" / "nats"
    nats_auth.add_worker(nats_dir, "honest")
    server = EmbeddedServer(nats_dir, free_port())
    await server.start()
    path, reloaded = nats_auth.add_worker(nats_dir, "mallory")  # a second GPU box joins: the server reloads
    assert reloaded and path.stat().st_mode & 0o777 == 0o600
    await asyncio.sleep(0.5)
    yield server, nats_dir
    await server.stop()


class Client:
    """One identity's connection, with the server's refusals as it reports them (permission violations)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def connect(self, url: str, nats_dir: Path, user: str) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        cfg = nats_auth.as_identity(load_settings(None).nats, user, nats_auth.read_password(nats_dir, user) or "")
        self.nc = await nats.connect(url, user=cfg.user, password=cfg.password, inbox_prefix=cfg.inbox_prefix,
                                     error_cb=on_error, max_reconnect_attempts=1)
        return self

    def refused(self, subject: str) -> bool:
        return any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in self.errors)


async def refused_publish(client: Client, subject: str, data: bytes = b"{}", **kw: Any) -> None:
    """A JetStream publish the server must refuse: no ack comes, and the client is told why."""
    with pytest.raises(Exception):  # noqa: B017 - nats-py reports it as a timeout (no ack)
        await client.nc.jetstream(timeout=1).publish(subject, data, **kw)
    await asyncio.sleep(0.2)
    assert client.refused(subject), client.errors


def fake_adapter(root: Path, marker: str) -> Path:
    adapter = root / marker / S.ADAPTER_DIR
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"marker": marker}))
    (adapter / "adapter_model.safetensors").write_bytes(marker.encode() * 50_000)  # several chunks
    (root / marker / S.SUMMARY_FILE).write_text(json.dumps({"backend": "peft", "final_loss": 1.0, "steps": 3}))
    return adapter


async def test_a_second_worker_identity_cannot_write_for_another(embedded, tmp_path: Path) -> None:
    server, nats_dir = embedded
    url = server.url
    settings = load_settings(None, data_dir=tmp_path / "data", log_level="warning",
                             nats={"url": url, "user": "academyd", "password": server.passwords["academyd"],
                                   "inbox_prefix": nats_auth.DAEMON_INBOX_PREFIX},
                             workers={"ack_wait_s": ACK_WAIT})
    timing = Timing(ACK_WAIT)
    daemon = await Client().connect(url, nats_dir, nats_auth.DAEMON)
    honest = await Client().connect(url, nats_dir, "worker-honest")
    mallory = await Client().connect(url, nats_dir, "worker-mallory")
    try:
        habitat = NatsHabitat(settings, daemon.nc, poll_s=0.2)
        ds = tmp_path / "daemon-files" / "train.jsonl"
        ds.parent.mkdir(parents=True)
        ds.write_text(json.dumps({"instruction": "i", "input": "", "output": "o"}) + "\n")
        spec = S.TrainSpec.from_dict({"base_model": "tiny", "dataset_path": str(ds),
                                      "output_dir": str(settings.runs_dir / "run-1")})
        handle = await habitat.start(TrainingJob(spec=spec, run_id="run-1"))
        events: list[dict[str, Any]] = []

        async def follow() -> None:
            async for ev in habitat.progress(handle):
                events.append(ev)

        with capture_logs() as logs:
            follower = asyncio.create_task(follow())

            # The honest worker takes the job, as `academyd worker` does.
            hjs = honest.nc.jetstream(timeout=timing.heartbeat_s)
            hwire = await Wire.open(hjs, settings, create=False)
            psub = await hjs.pull_subscribe_bind(durable=consumer_name("any"), stream=settings.workers.jobs_stream)
            [msg] = await psub.fetch(1, timeout=5)
            h = await HeldLease.acquire(hwire, msg, "run-1", "honest", timing, nak_delay_s=ACK_WAIT)
            assert h is not None
            mjs = mallory.nc.jetstream(timeout=2)
            mwire = await Wire.open(mjs, settings, create=False)

            async def honest_job() -> JobOutcome:
                await hjs.publish(events_subject("run-1", "honest"), ForwardedEvent.build(
                    run_id="run-1", worker="honest", attempt=1,
                    event={"type": "progress", "time": time.time(), "step": 1, "loss": 1.0}).encode())
                adapter = fake_adapter(tmp_path / "honest-host", "honest")
                prefix = "honest-a1"
                arts = {"adapter": await put_dir(hwire.artifacts, artifact_name("run-1", f"{prefix}/adapter.tar"),
                                                 adapter, scratch=tmp_path),
                        "summary": await put_file(hwire.artifacts, artifact_name("run-1", f"{prefix}/summary.json"),
                                                  adapter.parent / S.SUMMARY_FILE)}
                await attacks(arts["adapter"].name)
                await asyncio.sleep(timing.heartbeat_s * 2)  # the holder's beat writes over what was not honoured
                return JobOutcome(adapter=ArtifactRef.of(arts["adapter"]), adapter_sha256=adapter_sha256(adapter),
                                  summary=ArtifactRef.of(arts["summary"]),
                                  summary_inline=SummaryInline(backend="peft", final_loss=1.0, steps=3))

            async def attacks(adapter_name: str) -> None:
                # 1. Writing the honest worker's lease records, advertisement or events: refused by the server.
                forged = Lease.build(run_id="run-1", worker="honest", state="failed", attempt=1, reason="forged")
                await refused_publish(mallory, "$KV.academy_leases.run-1.honest", forged.encode())
                await refused_publish(mallory, "$KV.academy_workers.honest", Advertisement.build(
                    worker="honest", host="h", platform="p", cpu_threads=1, at=time.time()).encode())
                await refused_publish(mallory, events_subject("run-1", "honest"), ForwardedEvent.build(
                    run_id="run-1", worker="honest", attempt=1,
                    event={"type": "progress", "time": time.time(), "step": 99}).encode())
                # 2. In its own name: a takeover while the holder is fresh, a result, an end, events. The
                # server takes them (they are mallory's to write); the daemon does not honour them.
                evil = fake_adapter(tmp_path / "mallory-host", "mallory")
                m_adapter = await put_dir(mwire.artifacts, artifact_name("run-1", "mallory-a2/adapter.tar"), evil,
                                          scratch=tmp_path)
                m_summary = await put_file(mwire.artifacts, artifact_name("run-1", "mallory-a2/summary.json"),
                                           evil.parent / S.SUMMARY_FILE)
                result = JobOutcome(adapter=ArtifactRef.of(m_adapter), adapter_sha256=adapter_sha256(evil),
                                    summary=ArtifactRef.of(m_summary),
                                    summary_inline=SummaryInline(backend="peft", final_loss=0.1, steps=3))
                for lease in (Lease.build(run_id="run-1", worker="mallory", state="training", attempt=2),
                              Lease.build(run_id="run-1", worker="mallory", state="succeeded", attempt=2,
                                          result=result),
                              Lease.build(run_id="run-1", worker="mallory", state="succeeded", attempt=1,
                                          result=result)):
                    await write_over(mwire, "run-1", "mallory", lease)
                    held = (await (await habitat.wire()).lease("run-1"))[0]
                    assert (held.worker, held.attempt, held.state) == ("honest", 1, "training"), held
                    assert await habitat.status(handle) is JobStatus.RUNNING
                for worker in ("mallory", "honest"):  # its own subject: as itself, and in the holder's name
                    await mjs.publish(events_subject("run-1", "mallory"), ForwardedEvent.build(
                        run_id="run-1", worker=worker, attempt=1,
                        event={"type": "progress", "time": time.time(), "step": 77}).encode())
                # 3. An upload over the honest adapter's name: nats-py's put (a meta with a rollup header, then
                # a purge) is refused by the stream and the server; one without them is taken (the server
                # cannot tell it from an upload) and changes nothing that is read: the lease names the chunks.
                with pytest.raises(Exception):  # noqa: B017
                    await mwire.artifacts.obj.put(adapter_name, b"overwritten by mallory" * 10_000)
                await asyncio.sleep(0.2)
                assert mallory.refused("$JS.API.STREAM.PURGE.OBJ_academy_artifacts"), mallory.errors
                over = await put_file(mwire.artifacts, adapter_name, evil / "adapter_model.safetensors")
                assert (await mwire.artifacts.get_info(adapter_name)).nuid == over.nuid
                # 4. Purging the bucket: refused by the server; a rollup header (which purges as it
                # publishes): refused by the stream.
                with pytest.raises(Exception):  # noqa: B017
                    await mjs.purge_stream("OBJ_academy_artifacts")
                for subject in ("$O.academy_artifacts.C.mallory", "$KV.academy_leases.run-1.mallory"):
                    with pytest.raises(nats.js.errors.APIError, match="rollup"):
                        await mjs.publish(subject, b"x", headers={"Nats-Rollup": "all"})
                with pytest.raises(Exception):  # noqa: B017
                    await mjs.delete_stream("OBJ_academy_artifacts")

            outcome = await h.hold(honest_job())
            assert h.lost is None
            assert await h.finish("succeeded", result=outcome) is True
            await h.ack("succeeded")
            result = await habitat.result(handle)
            await asyncio.wait_for(follower, 10)

        # Registered: the honest adapter, byte for byte, read by the chunks the lease names.
        assert result.status is JobStatus.SUCCEEDED, result
        got = Path(result.adapter_path)
        assert adapter_sha256(got) == outcome.adapter_sha256
        assert json.loads((got / "adapter_config.json").read_text()) == {"marker": "honest"}
        assert result.summary is not None and result.summary["worker"]["id"] == "honest"
        # Progress: the honest worker's only; mallory's dropped, each said once.
        steps = [(e.get("worker"), e.get("step")) for e in events if e["type"] == "progress"]
        assert steps == [("honest", 1)], events
        assert events[-1]["type"] == S.EVENT_DONE and events[-1]["worker"] == "honest"
        dropped = [e for e in logs if e["event"] == "event_dropped"]
        assert len(dropped) == 2 and {("mallory" in e["reason"]) for e in dropped} == {True}, dropped
        not_honoured = [e for e in logs if e["event"] == "lease_record_not_honoured" and e["writer"] == "mallory"]
        assert any("heartbeat was fresh" in e["reason"] for e in not_honoured), not_honoured
        assert [e for e in logs if e["event"] == "lease_kept"], "the holder wrote over mallory's records"
        # The lease's records: mallory's are there (the server cannot tell them from a real takeover) and
        # fenced nothing; the last word is the honest worker's.
        kv = await daemon.nc.jetstream().key_value("academy_leases")
        history = [(e.key, json.loads(e.value)) for e in await kv.history("run-1.*")]
        assert {k for k, _ in history} == {"run-1.honest", "run-1.mallory"}
        assert history[-1][0] == "run-1.honest" and history[-1][1]["state"] == "succeeded"
        # Nothing was purged: the job's dataset is still there, as is the honest adapter's every chunk.
        info = await daemon.nc.jetstream().stream_info("OBJ_academy_artifacts")
        assert info.config.allow_rollup_hdrs is False
        assert honest.errors == [], honest.errors
    finally:
        for c in (daemon, honest, mallory):
            await c.nc.close()


def reversal_lesson(i: int, rng: Any) -> dict[str, Any]:
    from fixtures.nats import lesson
    from fixtures.trainer import WORDS

    words = rng.sample(WORDS, 4)
    return lesson(i, situation=f"Reverse the order of these words: {' '.join(words)}", action=" ".join(reversed(words)),
                  result="Sukces ✅", feedback=None)


@pytest.mark.timeout(900)
async def test_the_honest_worker_s_run_finishes_once_while_another_identity_attacks_it(
    start_daemon, start_worker, tiny_base_model, trainer_python, tmp_path
) -> None:
    """The daemon on its embedded server; `academyd worker` as `worker-honest` (a real process, the real
    trainer); `worker-mallory` attacking the job all the time it trains. One version, the honest one's."""
    import random
    import shutil

    from fixtures.nats import db_count, publish, wait_for
    from fixtures.trainer import FAST_HYPERPARAMETERS

    from academyd.registry import Registry

    data = tmp_path / "daemon" / "data"
    for w in ("honest", "mallory"):  # `academyd worker-identity <id>` on the daemon's host
        nats_auth.add_worker(data / "nats", w)
    port = free_port()
    settings = load_settings(
        None, data_dir=data, log_level="warning",
        nats={"embedded_port": port, "ack_wait_s": 5.0, "backoff_s": [1.0, 2.0], "max_deliver": 10,
              "fetch_timeout_s": 0.2},
        http={"enabled": False},
        training={"autorun": True, "habitat": "nats", "base_model": str(tiny_base_model),
                  "trainer_python": str(trainer_python), "backend": "peft", "cpu_threads": 1, "seed": 1,
                  "hyperparameters": {**FAST_HYPERPARAMETERS, "epochs": 4, "adjust": False}},
        workers={"ack_wait_s": ACK_WAIT},
        arena={"bootstrap_samples": 300, "generation_sample": 2, "generation_tolerance": 0.5},
    )
    d = await start_daemon(settings)
    url = f"nats://127.0.0.1:{port}"
    agent = await Client().connect(url, data / "nats", nats_auth.AGENT)
    rng = random.Random(5)
    for i in range(80):
        await publish(agent.nc.jetstream(), "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")
    await wait_for(lambda: db_count(settings.db_path, "SELECT COUNT(*) FROM lessons") >= 80, timeout=30)
    operator = await Client().connect(url, data / "nats", nats_auth.OPERATOR)
    published: list[dict[str, Any]] = []

    async def on_event(msg: Any) -> None:
        published.append({"subject": msg.subject, **json.loads(msg.data)})

    await operator.nc.subscribe("academy.training.>", cb=on_event)
    model = tmp_path / "hosts" / "honest" / "models" / "tiny"
    shutil.copytree(tiny_base_model, model)
    honest = start_worker(url, "honest", "--model", f"{tiny_base_model}={model}", "--gpu", "none",
                          "--cpu-threads", "1", ACADEMY_WORKERS__ACK_WAIT_S=str(ACK_WAIT),
                          ACADEMY_NATS__USER="worker-honest",
                          ACADEMY_NATS__PASSWORD=nats_auth.read_password(data / "nats", "worker-honest") or "")
    reply = d.app.evaluate("command", force=True, reason="test")
    assert reply["ok"], reply
    run_id = str(reply["run_id"])
    store = d.app.store

    mallory = await Client().connect(url, data / "nats", "worker-mallory")
    mjs = mallory.nc.jetstream(timeout=2)
    for _ in range(120):  # the daemon creates the jobs stream and the buckets at its first job
        with contextlib.suppress(Exception):
            mwire = await Wire.open(mjs, settings, create=False)
            break
        await asyncio.sleep(0.5)
    evil = fake_adapter(tmp_path / "mallory-host", "mallory")
    m_adapter = await put_dir(mwire.artifacts, artifact_name(run_id, "mallory-a9/adapter.tar"), evil, scratch=tmp_path)
    m_summary = await put_file(mwire.artifacts, artifact_name(run_id, "mallory-a9/summary.json"),
                               evil.parent / S.SUMMARY_FILE)
    result = JobOutcome(adapter=ArtifactRef.of(m_adapter), adapter_sha256=adapter_sha256(evil),
                        summary=ArtifactRef.of(m_summary),
                        summary_inline=SummaryInline(backend="peft", final_loss=0.01, steps=3))
    attacks = {"takeover": 0, "result": 0, "events": 0, "overwrite": 0, "refused": 0}

    async def attack_until_done() -> None:
        """Every second while the run trains, everything a second worker identity could try."""
        while store.get_run(run_id)["state"] not in ("succeeded", "failed", "refused"):
            await asyncio.sleep(1.0)
            held, rev = await mwire.lease(run_id)
            if held is None or held.final:
                continue
            for lease in (Lease.build(run_id=run_id, worker="mallory", state="training", attempt=held.attempt + 1),
                          Lease.build(run_id=run_id, worker="mallory", state="succeeded", attempt=held.attempt + 1,
                                      result=result)):
                try:
                    rev = await mwire.write_lease(run_id, "mallory", lease, last=rev)
                    attacks["takeover" if lease.state == "training" else "result"] += 1
                except Exception:
                    pass  # the holder wrote meanwhile
            for worker in ("mallory", held.worker or "honest"):
                await mjs.publish(events_subject(run_id, "mallory"), ForwardedEvent.build(
                    run_id=run_id, worker=worker, attempt=held.attempt,
                    event={"type": "progress", "time": time.time(), "step": 999, "loss": 0.001}).encode())
                attacks["events"] += 1
            for subject in (f"$KV.academy_leases.{run_id}.honest", events_subject(run_id, "honest")):
                await mallory.nc.publish(subject, b"{}")
            await put_file(mwire.artifacts, artifact_name(run_id, "honest-a1/adapter.tar"),
                           evil / "adapter_model.safetensors")  # squatting, then over, the honest adapter's name
            attacks["overwrite"] += 1
            with contextlib.suppress(Exception):
                await mjs.purge_stream("OBJ_academy_artifacts")
            with contextlib.suppress(Exception):
                await mjs.publish("$O.academy_artifacts.C.x", b"", headers={"Nats-Rollup": "all"})

    attacker = asyncio.create_task(attack_until_done())
    try:
        await wait_for(lambda: store.get_run(run_id)["state"] in ("succeeded", "failed", "refused"), timeout=700,
                       interval=0.5)
        await asyncio.wait_for(attacker, 30)
    finally:
        attacker.cancel()
    run = store.get_run(run_id)
    assert run["state"] == "succeeded", (run, honest.log[-3000:])
    assert attacks["takeover"] >= 3 and attacks["result"] >= 3 and attacks["overwrite"] >= 3, attacks
    reader = await Client().connect(url, data / "nats", nats_auth.DAEMON)  # a watch: the daemon's to create
    kv = await reader.nc.jetstream().key_value("academy_leases")
    history = [(e.key, json.loads(e.value)) for e in await kv.history(f"{run_id}.*")]
    assert {k for k, _ in history} == {f"{run_id}.honest", f"{run_id}.mallory"}
    final = [v for k, v in history if k == f"{run_id}.honest" and v["state"] == "succeeded"]
    assert len(final) == 1 and final[0]["worker"] == "honest" and final[0]["attempt"] == 1
    # One version, the honest worker's adapter byte for byte; nothing of mallory's anywhere.
    registry = Registry(store, settings)
    assert len(registry.list()) == 1
    registered = registry.get(run["version"])
    assert registered is not None and registered["run_id"] == run_id
    assert registered["adapter_sha256"] == final[0]["result"]["adapter_sha256"] != result.adapter_sha256
    progress = [e for e in published if e["subject"] == "academy.training.progress" and e.get("run_id") == run_id]
    assert progress and all(e.get("step") != 999 for e in progress), progress[-3:]
    # The honest worker was never fenced: every record mallory wrote over it was written over in turn.
    events = [e.get("event") for e in honest.events()]
    assert "job_lost" not in events and "lease_kept" in events, honest.log[-3000:]
    assert mallory.refused(f"$KV.academy_leases.{run_id}.honest") and mallory.refused("$JS.API.STREAM.PURGE")
    assert (await mjs.stream_info("OBJ_academy_artifacts")).state.messages > 0
    for c in (agent, operator, mallory, reader):
        await c.nc.close()
