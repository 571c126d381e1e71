"""Trust per worker: a job's lease is what its records say, each bound to the identity the server let write it.

The lease of `run_id` is a sequence of records in KV `academy_leases`, each under `<run_id>.<writer>`
(`academyd.worker.protocol.lease_key`): a worker's identity may publish only under its own id
(`academyd.nats_auth.worker_permissions`), the daemon writes under `_academyd`. Every write is one
compare-and-swap over all of `<run_id>.*` (JetStream's `Nats-Expected-Last-Subject-Sequence` with a
wildcard `...-Subject`), so the records of a job are totally ordered and each fences the next, whoever wrote it.

`effective_lease` reads them in that order and honours:
- the first valid record, then the holder's own records (same writer, same attempt);
- a takeover (another writer, a higher attempt) only when the holder gave the lease back (`released`) or
  its last honoured record is older than `Timing.fresh_s` by the server's timestamps (an honest taker waits
  `takeover_wait_s` of silence first, an honest holder stops `stop_after_s` after its last write);
- the daemon's own end (cancelled before anyone took it, a refused job) while the job is not over.
Not honoured: a record that is not a valid lease of the run, one whose `worker` is not the key's writer, a
takeover while the holder's heartbeat is fresh, an earlier attempt, anything after the end. Such a record
still moves the fence: the holder finds its next write refused, reads the lease, finds itself still the
holder and writes over it (`academyd.worker.lease.HeldLease.refresh`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError

from academyd.worker.protocol import DAEMON_WRITER, Lease, Timing, WireError

log = structlog.get_logger("academyd.worker.trust")

WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a failed expected-last-sequence check


@dataclass(frozen=True)
class Record:
    """One lease record as the server stored it: its writer (the key's last token), sequence and time."""

    writer: str
    seq: int
    time: float  # the server's timestamp, seconds
    lease: Lease | None  # None: not a valid lease of the run
    why: str | None = None  # why it is not valid


@dataclass
class Verdict:
    """The effective lease after some records, and what was not honoured (said once per record)."""

    lease: Lease | None = None
    last_time: float = 0.0  # server time of the holder's last honoured record
    refused: list[tuple[Record, str]] = field(default_factory=list)


def judge(v: Verdict, rec: Record, timing: Timing) -> None:
    """`v` after `rec` (see the module docstring). Pure."""
    new, cur = rec.lease, v.lease

    def refuse(why: str) -> None:
        v.refused.append((rec, why))

    if new is None:
        return refuse(rec.why or "not a valid lease")
    if rec.writer == DAEMON_WRITER:
        if not new.final:
            return refuse("the daemon writes only an end")
        if cur is not None and cur.final:
            return refuse(f"after the end ({cur.state})")
        v.lease, v.last_time = new, rec.time
        return None
    if new.worker != rec.writer:
        return refuse(f"written by {rec.writer} in the name of {new.worker}")
    if cur is None:
        v.lease, v.last_time = new, rec.time
        return None
    if cur.final:
        return refuse(f"after the end ({cur.state})")
    if rec.writer == cur.worker and new.attempt == cur.attempt:
        v.lease, v.last_time = new, rec.time
        return None
    if new.attempt <= cur.attempt:
        return refuse(f"attempt {new.attempt}, the lease is at attempt {cur.attempt} ({cur.worker})")
    age = rec.time - v.last_time
    if cur.state != "released" and age < timing.fresh_s:
        return refuse(f"a takeover {age:.1f} s after the holder's last record ({cur.worker}, attempt "
                      f"{cur.attempt}): its heartbeat was fresh (< {timing.fresh_s:.1f} s)")
    v.lease, v.last_time = new, rec.time
    return None


def effective_lease(records: list[Record], timing: Timing) -> Verdict:
    """The lease that `records` (in sequence order) make. Pure."""
    v = Verdict()
    for rec in records:
        judge(v, rec, timing)
    return v


@dataclass
class _Seen:
    verdict: Verdict
    last_seq: int  # the last record judged


class LeaseBook:
    """Reads and writes the lease records of jobs in one KV bucket, keeping what was judged per run."""

    def __init__(self, js: Any, bucket: str, timing: Timing) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.timing = timing
        self._seen: dict[str, _Seen] = {}

    def subject(self, run_id: str, writer: str) -> str:
        return f"$KV.{self.bucket}.{run_id}.{writer}"

    def _record(self, run_id: str, msg: Any) -> Record | None:
        writer = str(msg.subject).rsplit(".", 1)[-1]
        headers = msg.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None
        t = msg.time.timestamp() if isinstance(getattr(msg, "time", None), datetime) else 0.0
        try:
            lease = Lease.decode(msg.data)
            if lease.run_id != run_id:
                raise WireError("foreign", f"the lease under {run_id} is run {lease.run_id}'s")
        except WireError as exc:
            return Record(writer, int(msg.seq), t, None, str(exc))
        return Record(writer, int(msg.seq), t, lease)

    async def latest_seq(self, run_id: str) -> int:
        """The sequence of the newest record of `run_id` (0: none): what the next write must expect."""
        try:
            msg = await self.js.get_last_msg(self.stream, self.subject(run_id, "*"))
        except NotFoundError:
            return 0
        return int(msg.seq)

    async def lease(self, run_id: str) -> tuple[Lease | None, int]:
        """The effective lease of `run_id` and the fence's revision (the newest record's sequence):
        (None, 0) when there is no record; (None, rev) when none is honoured (nothing in them is trusted,
        but the revision still fences: a taker waits it out as for a silent holder)."""
        last = await self.latest_seq(run_id)
        if last == 0:
            self._seen.pop(run_id, None)
            return None, 0
        seen = self._seen.get(run_id)
        if seen is None or last < seen.last_seq:
            seen = _Seen(Verdict(), 0)
        seq = seen.last_seq + 1
        while seq <= last:
            try:
                msg = await self.js.get_msg(self.stream, seq, subject=self.subject(run_id, "*"), next=True)
            except NotFoundError:
                break
            rec = self._record(run_id, msg)
            seq = int(msg.seq) + 1
            seen.last_seq = int(msg.seq)
            if rec is None:
                continue
            before = len(seen.verdict.refused)
            judge(seen.verdict, rec, self.timing)
            for r, why in seen.verdict.refused[before:]:
                log.warning("lease_record_not_honoured", run_id=run_id, writer=r.writer, revision=r.seq, reason=why)
            del seen.verdict.refused[:]
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[run_id] = seen
        return seen.verdict.lease, max(last, seen.last_seq)

    async def write(self, run_id: str, writer: str, lease: Lease, *, last: int) -> int:
        """Append `lease` as `writer`'s record if the newest record of `run_id` is still `last` (0: none);
        its sequence. KeyWrongLastSequenceError when another record came first."""
        try:
            ack = await self.js.publish(self.subject(run_id, writer), lease.encode(), headers={
                "Nats-Expected-Last-Subject-Sequence": str(last),
                "Nats-Expected-Last-Subject-Sequence-Subject": self.subject(run_id, "*"),
            })
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=exc.description) from None
            raise
        return int(ack.seq)


def worker_identity(settings: Any, worker_id: str | None) -> tuple[str, Any]:
    """This worker's id and the NATS settings it connects with. A worker connecting as `worker-<id>`
    (configured, or found in the embedded server's data directory for `--id`) is that id and nothing else,
    with its own inbox prefix; any other identity (the old shared `academy-worker`, a server without users)
    gives no per-worker trust, which is logged. HabitatError when `--id` contradicts the identity."""
    from academyd.habitat.base import HabitatError
    from academyd.nats_auth import WORKER_INBOX_PREFIX, as_identity, read_password, worker_of, worker_user

    n = settings.nats
    bound = worker_of(n.user)
    if bound is None and worker_id and not (n.user or n.token or n.creds_file):
        password = read_password(settings.nats_dir, worker_user(worker_id))
        if password is not None:
            n, bound = as_identity(n, worker_user(worker_id), password), worker_id
    if bound is not None:
        if worker_id and worker_id != bound:
            raise HabitatError(f"this worker connects as {n.user}, so its id is {bound}, not {worker_id}: drop "
                               "--id or give it the identity of that worker")
        if n.inbox_prefix == "_INBOX":
            n = n.model_copy(update={"inbox_prefix": WORKER_INBOX_PREFIX + bound})
        return bound, n
    import os
    import socket

    log.warning("worker_identity_shared", user=n.user, hint=(
        "this worker does not connect as its own identity (worker-<id>): the server cannot tell its lease "
        "records and events from another worker's; `academyd worker-identity <id>` creates one"))
    return worker_id or f"{socket.gethostname().replace('.', '-')}-{os.getpid()}", n
