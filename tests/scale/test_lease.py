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
from tests.fixtures.scale import write_over

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
    """A takeover honoured (the holder silent longer than `fresh_s`: here, its heartbeat not yet started)
    fences the holder: its first refresh fails and everything it does for the job stops."""
    wire, msg, _ = await a_job(nc, tmp_path)
    h = await HeldLease.acquire(wire, msg, "run-1", "w1", Timing(ACK_WAIT), nak_delay_s=ACK_WAIT)
    assert h is not None
    await asyncio.sleep(Timing(ACK_WAIT).fresh_s + 0.2)
    _, rev = await wire.lease("run-1")
    await wire.write_lease("run-1", "w2", Lease.build(run_id="run-1", worker="w2", state="training", attempt=2),
                           last=rev)
    taken = time.monotonic()
    assert (await wire.lease("run-1"))[0].worker == "w2"
    stopped: list[float] = []

    async def slow_transfer() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(time.monotonic())
            raise

    with pytest.raises(LeaseLost, match="fenced"):
        await h.hold(slow_transfer())
    assert stopped and stopped[0] - taken <= Timing(ACK_WAIT).heartbeat_s + 0.5
    # Nothing more is written in w2's lease by w1.
    assert await h.finish("succeeded") is False
    assert (await wire.lease("run-1"))[0].worker == "w2"


async def test_a_takeover_while_the_holder_s_heartbeat_is_fresh_is_not_honoured(nc, tmp_path: Path) -> None:
    """Records written over a fresh holder (a takeover, an end in its name, a record naming the holder):
    neither side honours them; the holder writes over them at its next beat and finishes its job."""
    wire, msg, _ = await a_job(nc, tmp_path)
    h = await HeldLease.acquire(wire, msg, "run-1", "w1", Timing(ACK_WAIT), nak_delay_s=ACK_WAIT)
    assert h is not None

    async def work() -> str:
        for forged in (Lease.build(run_id="run-1", worker="w2", state="training", attempt=2),
                       Lease.build(run_id="run-1", worker="w1", state="failed", attempt=1, reason="forged"),
                       Lease.build(run_id="run-1", worker="w2", state="failed", attempt=3, reason="forged")):
            await asyncio.sleep(Timing(ACK_WAIT).heartbeat_s * 1.5)
            await write_over(wire, "run-1", "w2", forged)  # lands, even when w1 beats meanwhile
            lease, _ = await wire.lease("run-1")
            assert (lease.worker, lease.attempt, lease.state) == ("w1", 1, "training"), lease
        await asyncio.sleep(Timing(ACK_WAIT).heartbeat_s * 2)
        return "done"

    assert await h.hold(work()) == "done"
    assert h.lost is None
    assert await h.finish("failed", reason="the holder's own end") is True
    lease, _ = await wire.lease("run-1")
    assert (lease.worker, lease.attempt, lease.state, lease.reason) == ("w1", 1, "failed", "the holder's own end")
