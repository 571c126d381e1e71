"""The worker identities of the shipped production config (systemd/nats-server.conf, one user per GPU host)
on a real nats-server: `worker-gpu1` can do everything a worker does (bind, pull and ack a job, hold and
refresh its lease, move artifacts, forward events) in its own name, and nothing an agent or the daemon may
(publish inbound subjects, command, delete or purge streams), nor anything in `worker-gpu2`'s name.

The daemon's side runs as the config's `academyd` identity and creates the streams and buckets, as in
production; the worker's steps are the ones `academyd.worker.run` takes, through the same modules.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from academyd import nats_auth
from academyd.artifacts import get_file, put_file
from academyd.embedded import find_server_binary, free_port
from academyd.habitat.base import TrainingJob
from academyd.habitat.nats import NatsHabitat
from academyd.settings import load_settings
from academyd.trainer.spec import TrainSpec
from academyd.worker.protocol import (
    Advertisement,
    ForwardedEvent,
    JobMessage,
    Lease,
    Wire,
    WireError,
    artifact_name,
    consumer_name,
    dead_letter_job,
    events_subject,
    job_subject,
)

SHIPPED_CONF = Path(__file__).resolve().parents[2] / "systemd" / "nats-server.conf"
PASSWORDS = {"VENOM_NATS_PASSWORD": "venom-pw", "OPERATOR_NATS_PASSWORD": "operator-pw",
             "ACADEMYD_NATS_PASSWORD": "academyd-pw", "ACADEMY_WORKER_GPU1_NATS_PASSWORD": "worker-pw",
             "ACADEMY_WORKER_GPU2_NATS_PASSWORD": "gpu2-pw",
             "ACADEMY_FOLLOWER_NATS_PASSWORD": "follower-pw"}


@pytest.fixture
def production_server(tmp_path: Path) -> Any:
    port = free_port()
    text = SHIPPED_CONF.read_text()
    for old, new in (("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{port}"),
                     ("http: 127.0.0.1:8222", f"http: 127.0.0.1:{free_port()}"),
                     ("store_dir: /var/lib/nats/jetstream", f'store_dir: "{tmp_path / "js"}"')):
        assert old in text, f"the shipped config no longer has {old!r}: adapt this test"
        text = text.replace(old, new)
    conf = tmp_path / "production.conf"
    conf.write_text(text)
    proc = subprocess.Popen([str(find_server_binary()), "-c", str(conf)], env={**os.environ, **PASSWORDS},
                            stdout=open(tmp_path / "server.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "server.log").read_text()
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


async def connect(url: str, user: str, password: str, inbox: str, errors: list[str]) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(url, user=user, password=password, inbox_prefix=inbox, error_cb=on_error,
                              max_reconnect_attempts=1)


async def test_the_worker_identity_can_work_and_nothing_more(production_server, tmp_path: Path) -> None:
    url = production_server
    settings = load_settings(None, data_dir=tmp_path / "daemon", nats={"url": url})
    daemon_errors: list[str] = []
    daemon = await connect(url, "academyd", "academyd-pw", "_INBOX_academyd", daemon_errors)
    ds = tmp_path / "daemon-files" / "train.jsonl"
    ds.parent.mkdir(parents=True)
    ds.write_text(json.dumps({"instruction": "i", "input": "", "output": "o"}) + "\n")
    habitat = NatsHabitat(settings, daemon)
    spec = TrainSpec.from_dict({"base_model": str(tmp_path / "base"), "dataset_path": str(ds),
                                "output_dir": str(tmp_path / "daemon" / "runs" / "run-1")})
    await habitat.start(TrainingJob(spec=spec, run_id="run-1"))

    errors: list[str] = []
    nc = await connect(url, "worker-gpu1", "worker-pw", "_INBOX_w_gpu1", errors)
    try:
        js = nc.jetstream(timeout=5)
        wire = await Wire.open(js, settings, create=False)
        psub = await js.pull_subscribe_bind(durable=consumer_name("any"), stream=settings.workers.jobs_stream)
        [msg] = await psub.fetch(1, timeout=5)
        job = JobMessage.decode(msg.data)
        await msg.in_progress()
        held = Lease.build(run_id="run-1", worker="gpu1", state="training", attempt=1)
        rev = await wire.write_lease("run-1", "gpu1", held, last=0)
        await wire.workers.put("gpu1", Advertisement.build(worker="gpu1", host="h", platform="p", cpu_threads=1,
                                                           at=time.time()).encode())
        got = await get_file(wire.artifacts, job.inputs.dataset.name, tmp_path / "worker" / "ds.jsonl",
                             sha256=job.inputs.dataset.sha256)
        assert got.size == ds.stat().st_size
        (tmp_path / "worker" / "summary.json").write_text("{}")
        await put_file(wire.artifacts, artifact_name("run-1", "gpu1-a1/summary.json"),
                       tmp_path / "worker" / "summary.json")
        await js.publish(events_subject("run-1", "gpu1"), ForwardedEvent.build(
            run_id="run-1", worker="gpu1", attempt=1, event={"type": "progress", "time": 1.0, "step": 1}).encode())
        rev = await wire.write_lease("run-1", "gpu1", held.changed(state="failed", reason="test"), last=rev)
        assert (await wire.lease("run-1"))[0].state == "failed"
        await msg.ack_sync(timeout=5)
        # A job message that is not one: dead-lettered (the DLQ stream is the daemon's bus's) and terminated.
        await daemon.jetstream().add_stream(name=settings.nats.dlq_stream, subjects=["academy.dlq.>"])
        await daemon.jetstream().publish(job_subject("bad-1", False), b"not a job")
        [bad] = await psub.fetch(1, timeout=5)
        try:
            JobMessage.decode(bad.data)
        except WireError as exc:
            assert await dead_letter_job(js, bad, exc)
        await bad.term()
        assert (await daemon.jetstream().stream_info(settings.nats.dlq_stream)).state.messages == 1
        assert errors == [], errors

        # Nothing more: no inbound subject, no command, no stream administration, no other inbox, nothing
        # in gpu2's name, no purge (by the API, or by a rollup header, which the streams refuse).
        await nc.publish("lesson.created", b"{}")
        await nc.publish("academy.cmd.promote", b'{"version": "v1"}')
        for subject in ("$KV.academy_leases.run-1.gpu2", "academy.jobs.events.run-1.gpu2", "$KV.academy_workers.gpu2"):
            await nc.publish(subject, b"{}")
        await nc.flush()
        with pytest.raises(Exception):
            await js.delete_stream(settings.workers.jobs_stream)
        with pytest.raises(Exception):
            await js.purge_stream(f"OBJ_{settings.workers.artifacts_bucket}")
        for subject in ("$O.academy_artifacts.C.x", "$KV.academy_leases.run-1.gpu1"):
            with pytest.raises(Exception, match="rollup"):
                await js.publish(subject, b"x", headers={"Nats-Rollup": "all"})
        await nc.subscribe("_INBOX_academyd.>")
        await nc.subscribe("_INBOX_w_gpu2.>")
        await nc.flush()
        await asyncio.sleep(0.3)
        refused = " ".join(errors).lower()
        assert "lesson.created" in refused and "academy.cmd.promote" in refused, errors
        assert "_inbox_academyd" in refused and "_inbox_w_gpu2" in refused, errors
        assert all(s.lower() in refused for s in ("$kv.academy_leases.run-1.gpu2", "academy.jobs.events.run-1.gpu2",
                                                  "$kv.academy_workers.gpu2", "$js.api.stream.purge")), errors
        await daemon.jetstream().stream_info(settings.workers.jobs_stream)  # still there
        assert (await daemon.jetstream().stream_info("OBJ_academy_artifacts")).state.messages > 0
    finally:
        await nc.close()
        await daemon.close()


def test_the_shipped_worker_users_are_what_academyd_renders() -> None:
    """One user per GPU host, each exactly `academyd worker-identity <id> --production`'s block."""
    text = SHIPPED_CONF.read_text()
    for worker in ("gpu1", "gpu2"):
        assert nats_auth.render_production_worker(worker) in text, worker
    assert "academy-worker" not in text.replace("academy-workers-", "")  # the old shared user is gone
