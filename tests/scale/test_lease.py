"""The lease as one object that owns its heartbeat (academyd.worker.lease.HeldLease), on a real nats-server:
work slower than the job's ack wait is held (in-progress acks, CAS refreshes) and never redelivered; a lease
taken by another writer stops the work at once, whatever it was doing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from academyd.settings import load_settings
from academyd.worker.lease import HeldLease, LeaseLost
from academyd.worker.protocol import Lease, Timing, Wire, consumer_name, job_subject

ACK_WAIT = 2.0  # heartbeat 0.5 s, a holder stops after 1 s without a refresh


async def a_job(nc: Any, tmp_path: Path) -> tuple[Wire, Any, Any]:
    settings = load_settings(None, data_dir=tmp_path, nats={"url": "nats://unused"}, workers={"ack_wait_s": ACK_WAIT})
    js = nc.jetstream(timeout=5)
    wire = await Wire.open(js, settings, create=True)
    await js.publish(job_subject("run-1", False), b"{}")
    psub = await js.pull_subscribe_bind(durable=consumer_name("any"), stream=settings.workers.jobs_stream)
    [msg] = await psub.fetch(1, timeout=5)
    return wire, msg, psub


async def test_work_slower_than_the_ack_wait_is_held_from_acquire_to_ack(nc, tmp_path: Path) -> None:
    wire, msg, psub = await a_job(nc, tmp_path)
    h = await HeldLease.acquire(wire, msg, "run-1", "w1", Timing(ACK_WAIT), nak_delay_s=ACK_WAIT)
    assert h is not None
    first = h.rev

    async def slow_transfer() -> str:
        # Meanwhile a rival worker asks for work for 3 ack waits: the job is not redelivered to it.
        with pytest.raises(TimeoutError):
            await psub.fetch(1, timeout=3 * ACK_WAIT)
        return "done"

    assert await h.hold(slow_transfer()) == "done"
    assert h.rev - first >= 3 * ACK_WAIT / Timing(ACK_WAIT).heartbeat_s - 2  # refreshed every heartbeat
    assert await h.finish("failed", reason="test") is True
    await h.ack("failed")
    assert (await wire.lease("run-1"))[0].state == "failed"
    with pytest.raises(TimeoutError):  # acked: gone for good
        await psub.fetch(1, timeout=ACK_WAIT)


async def test_a_lease_taken_by_another_writer_stops_the_work_within_a_heartbeat(nc, tmp_path: Path) -> None:
    wire, msg, _ = await a_job(nc, tmp_path)
    h = await HeldLease.acquire(wire, msg, "run-1", "w1", Timing(ACK_WAIT), nak_delay_s=ACK_WAIT)
    assert h is not None
    stopped: list[float] = []

    async def slow_transfer() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(time.monotonic())
            raise

    async def take() -> float:
        await asyncio.sleep(ACK_WAIT)
        await wire.leases.put("run-1", Lease.build(run_id="run-1", worker="w2", state="training", attempt=2).encode())
        return time.monotonic()

    taker = asyncio.create_task(take())
    with pytest.raises(LeaseLost, match="fenced"):
        await h.hold(slow_transfer())
    taken = await taker
    assert stopped and stopped[0] - taken <= Timing(ACK_WAIT).heartbeat_s + 0.5
    # Nothing more is written in w2's lease by w1.
    assert await h.finish("succeeded") is False
    assert (await wire.lease("run-1"))[0].worker == "w2"
