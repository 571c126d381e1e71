"""A job's lease as one object that owns its heartbeat, from acquire to ack.

`HeldLease.acquire` takes the lease (or leaves the job to a holder that still refreshes it); `hold(body)`
runs everything the worker does for the job (downloads, the trainer, uploads, the result record) as one
task while a heartbeat sends an in-progress ack and a compare-and-swap refresh every `heartbeat_s`. Once
the lease is lost (fenced by another writer, or not refreshed for `stop_after_s`), the heartbeat cancels
that task: whatever it was doing (a transfer, waiting on the trainer) stops, and its cleanup ends the
trainer. `finish` records the end in the lease (the fence decides), `ack` then acks the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from nats.js.errors import KeyWrongLastSequenceError
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, retry_if_not_exception_type
from tenacity import stop_after_attempt, wait_fixed

from academyd.worker.protocol import Lease, Timing, Wire, WireError, clip

log = structlog.get_logger("academyd.worker")
T = TypeVar("T")


class LeaseLost(Exception):
    """The lease is someone else's now (or could not be refreshed in time): stop all work on the job."""


@dataclass
class HeldLease:
    """The job in hand: its lease (as last written) and revision, and why it must stop, if it must."""

    wire: Wire
    msg: Any  # the job message: in-progress acks while held, the ack at the end
    run_id: str
    worker: str
    lease: Lease
    rev: int
    timing: Timing
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lost: str | None = None  # fenced or cut off: the job is someone else's now
    cancelled: bool = False  # the daemon asked
    stopping: bool = False  # this worker is shutting down
    last_ok: float = field(default_factory=time.monotonic)
    trainer_running: bool = False  # set by the worker while its trainer runs (for what the heartbeat says)

    @classmethod
    async def acquire(cls, wire: Wire, msg: Any, run_id: str, worker: str, timing: Timing,
                      nak_delay_s: float) -> HeldLease | None:
        """Take the lease, or leave the job alone (finished, or held by a worker that still refreshes)."""
        while True:
            lease, rev = await wire.lease(run_id)
            if lease is not None and lease.final:
                log.info("job_already_finished", run_id=run_id, state=lease.state)
                await msg.ack()
                return None
            # An entry that is not a valid lease (lease None, rev > 0) is trusted for nothing (no attempt, no
            # checkpoint) but waited out as a holder would be: its writer may still be refreshing it.
            new = Lease.build(run_id=run_id, worker=worker, host=socket.gethostname(), state="training",
                              attempt=(lease.attempt if lease else 0) + 1,
                              checkpoint=lease.checkpoint if lease else None)
            try:
                if rev == 0:
                    return cls(wire, msg, run_id, worker, new, await wire.write_lease(run_id, worker, new, last=0),
                               timing)
                if lease is None or lease.state != "released":
                    # Held: take it only after a full window of silence, so its holder has stopped by then.
                    holder = lease.worker if lease else "(not a valid lease)"
                    log.info("lease_wait", run_id=run_id, holder=holder, wait_s=timing.takeover_wait_s)
                    deadline = time.monotonic() + timing.takeover_wait_s
                    while time.monotonic() < deadline:
                        with contextlib.suppress(Exception):
                            await msg.in_progress()
                        await asyncio.sleep(min(timing.heartbeat_s / 2, max(0.0, deadline - time.monotonic())))
                        if (await wire.lease(run_id))[1] != rev:
                            break
                    if (await wire.lease(run_id))[1] != rev:
                        log.info("lease_alive", run_id=run_id, holder=holder)
                        await msg.nak(delay=nak_delay_s)
                        return None
                return cls(wire, msg, run_id, worker, new, await wire.write_lease(run_id, worker, new, last=rev),
                           timing)
            except KeyWrongLastSequenceError:
                continue  # someone else moved first: look again

    async def refresh(self, **changes: Any) -> bool:
        """Compare-and-swap the lease (a heartbeat, a checkpoint, the end); False once it is lost. A record
        written meanwhile that is not honoured (academyd.worker.trust: a takeover while this heartbeat was
        fresh, one in this worker's name from another writer) is written over: the lease is still ours."""
        async with self.lock:
            if self.lost is not None:
                return False
            value = self.lease.changed(**changes, beat=round(time.time(), 3))  # WireError: a bug here, not sent
            try:
                self.rev = await self.wire.write_lease(self.run_id, self.worker, value, last=self.rev)
            except KeyWrongLastSequenceError:
                held, rev = await self.wire.lease(self.run_id)  # (a write of ours whose ack was lost counts)
                if held is None or held.final or (held.worker, held.attempt) != (self.worker, self.lease.attempt):
                    self.lost = "fenced: another worker holds the lease"
                    return False
                log.warning("lease_kept", run_id=self.run_id, worker=self.worker, attempt=self.lease.attempt,
                            revision=rev, reason="a record written over this holder's fresh lease is not honoured")
                try:
                    self.rev = await self.wire.write_lease(self.run_id, self.worker, value, last=rev)
                except KeyWrongLastSequenceError:
                    self.lost = "fenced: another worker holds the lease"
                    return False
            self.lease = value
            self.last_ok = time.monotonic()
            return True

    async def hold(self, body: Coroutine[Any, Any, T]) -> T:
        """Run `body` under the heartbeat; LeaseLost (body cancelled) once the lease is lost."""
        work = asyncio.create_task(body, name=f"job:{self.run_id}")
        beat = asyncio.create_task(self._heartbeat(work), name=f"heartbeat:{self.run_id}")
        try:
            return await work
        except asyncio.CancelledError:
            if self.lost is not None and not _cancelling():
                raise LeaseLost(self.lost) from None
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise
        finally:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat

    async def _heartbeat(self, work: asyncio.Task[Any]) -> None:
        """A refresh every heartbeat (every quarter beat once one failed); the work stops once no write of
        the lease (a beat, a checkpoint) has succeeded for `stop_after_s`, measured from the last one."""
        t = self.timing
        self.last_ok = time.monotonic()
        while True:
            since = time.monotonic() - self.last_ok
            pause = t.heartbeat_s / 4 if since >= t.heartbeat_s * 1.5 else t.heartbeat_s
            await asyncio.sleep(max(0.0, min(pause, t.stop_after_s - since)))
            ok: bool | None = None
            left = t.stop_after_s - (time.monotonic() - self.last_ok)
            if left > 0:
                with contextlib.suppress(Exception):
                    await self.msg.in_progress()
                try:
                    ok = await asyncio.wait_for(self.refresh(), min(t.heartbeat_s, left))
                except (WireError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # timeout, disconnected: the lease may run out
                    log.debug("lease_refresh_failed", run_id=self.run_id, error=type(exc).__name__)
            if ok:
                log.info("heartbeat", run_id=self.run_id, worker=self.worker, rev=self.rev, time=round(time.time(), 3))
                continue
            if ok is False or time.monotonic() - self.last_ok >= t.stop_after_s:
                if self.lost is None:
                    self.lost = f"cut off from NATS for {time.monotonic() - self.last_ok:.1f} s (lease not refreshed)"
                log.warning("trainer_stopping" if self.trainer_running else "job_stopping", run_id=self.run_id,
                            worker=self.worker, reason=self.lost, time=round(time.time(), 3))
                work.cancel()  # everything for this job stops: a transfer, the trainer (its cleanup kills it)
                return

    async def finish(self, state: str, **fields: Any) -> bool:
        """Record the end in the lease (the fence decides); False when it could not be recorded (lost, or
        unreachable for good): the job must then not be acked."""
        if "reason" in fields:
            fields["reason"] = clip(fields["reason"])
        if fields.get("error_code") is not None:
            fields["error_code"] = str(fields["error_code"])[:100]
        ok = False
        with contextlib.suppress(RetryError):  # 20 tries that all failed: not recorded
            async for tried in AsyncRetrying(
                retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(WireError),
                wait=wait_fixed(self.timing.heartbeat_s / 4), stop=stop_after_attempt(20),
            ):
                with tried:
                    ok = await self.refresh(state=state, **fields)
        if not ok:
            log.warning("job_result_not_recorded", run_id=self.run_id, worker=self.worker,
                        reason=self.lost or "unreachable")
        return ok

    async def ack(self, state: str) -> None:
        """The job is done (its end is in the lease): ack it, so it is never delivered again."""
        with contextlib.suppress(RetryError):  # 10 tries that all failed: the lease says it is done anyway
            async for tried in AsyncRetrying(retry=retry_if_exception_type(Exception), wait=wait_fixed(0.5),
                                             stop=stop_after_attempt(10)):
                with tried:
                    await self.msg.ack_sync(timeout=self.timing.heartbeat_s)
        log.info("job_acked", run_id=self.run_id, worker=self.worker, state=state)

    async def release(self) -> None:
        """Give the lease back (a clean stop: another worker takes it at once) and nak the job."""
        with contextlib.suppress(Exception):
            if await self.refresh(state="released"):
                await self.msg.nak()
        log.info("job_released", run_id=self.run_id, worker=self.worker)


def _cancelling() -> bool:
    """The caller's own task is being cancelled (shutdown), not just the job's work."""
    task = asyncio.current_task()
    return bool(task and task.cancelling())
