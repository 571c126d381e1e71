"""The worker identity of the shipped production config (systemd/nats-server.conf) on a real nats-server:
it can do everything a worker does (bind, pull and ack a job, hold and refresh its lease, move artifacts,
forward events) and nothing an agent or the daemon may (publish inbound subjects, command, delete streams).

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
             "ACADEMYD_NATS_PASSWORD": "academyd-pw", "ACADEMY_WORKER_NATS_PASSWORD": "worker-pw",
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
    nc = await connect(url, "academy-worker", "worker-pw", "_INBOX_worker", errors)
    try:
        js = nc.jetstream(timeout=5)
        wire = await Wire.open(js, settings, create=False)
        psub = await js.pull_subscribe_bind(durable=consumer_name("any"), stream=settings.workers.jobs_stream)
        [msg] = await psub.fetch(1, timeout=5)
        job = JobMessage.decode(msg.data)
        await msg.in_progress()
        held = Lease.build(run_id="run-1", worker="w", state="training", attempt=1)
        rev = await wire.leases.create("run-1", held.encode())
        await wire.workers.put("w", Advertisement.build(worker="w", host="h", platform="p", cpu_threads=1,
                                                        at=time.time()).encode())
        got = await get_file(wire.artifacts, job.inputs.dataset.name, tmp_path / "worker" / "ds.jsonl",
                             sha256=job.inputs.dataset.sha256)
        assert got.size == ds.stat().st_size
        (tmp_path / "worker" / "summary.json").write_text("{}")
        await put_file(wire.artifacts, artifact_name("run-1", "summary.json"), tmp_path / "worker" / "summary.json")
        await js.publish(events_subject("run-1"), ForwardedEvent.build(
            run_id="run-1", worker="w", attempt=1, event={"type": "progress", "time": 1.0, "step": 1}).encode())
        rev = await wire.leases.update("run-1", held.changed(state="failed", reason="test").encode(), last=rev)
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

        # Nothing more: no inbound subject, no command, no stream administration, no other inbox.
        await nc.publish("lesson.created", b"{}")
        await nc.publish("academy.cmd.promote", b'{"version": "v1"}')
        await nc.flush()
        with pytest.raises(Exception):
            await js.delete_stream(settings.workers.jobs_stream)
        await nc.subscribe("_INBOX_academyd.>")
        await nc.flush()
        await asyncio.sleep(0.3)
        refused = " ".join(errors).lower()
        assert "lesson.created" in refused and "academy.cmd.promote" in refused, errors
        assert "_inbox_academyd" in refused, errors
        await daemon.jetstream().stream_info(settings.workers.jobs_stream)  # still there
    finally:
        await nc.close()
        await daemon.close()
