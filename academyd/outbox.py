"""The outbox relay: what the daemon publishes is first written to SQLite in the transaction that makes
it true, then published here (JetStream, `Nats-Msg-Id` = the row's msg id) and marked.

A crash between commit and publish leaves the row unpublished; the relay publishes it after restart,
and the server's duplicate window drops a second copy of one that did get out just before the crash.

Why a publish failed decides what happens to the row (`classify`):

- **transient** (a JetStream timeout, a 503 or "no responders" while a stream has no leader or lost its
  quorum, a full stream, the connection going): not the row's fault. Nothing is counted against it; the
  relay backs off (`outbox.backoff_s` doubling up to `outbox.backoff_max_s`) and tries again, for ever.
  While it lasts the daemon reports an outage (`health` component "outbox": `academyd status`, /healthz
  503, `academy_degraded{component="outbox"}`, `academy_outbox_transient_failures`).
- **permanent** (too large for the server, a subject no stream captures, a request the server refuses as
  bad): the row's attempt is counted with its error; after `outbox.max_attempts` it is parked, shown by
  `academyd outbox list` and `academy.status`, until `academyd outbox retry` unparks it.

Order is kept: a transient failure ends the relay's pass (every later row would meet the same outage), and
a parked row holds back the later rows of its subject (a consumer sees `model.promoted` for v2 after v1's,
never before) while other subjects go on.

Published rows are deleted after `outbox.retention_h` (the stream keeps the events themselves).

Progress events (`academy.training.progress`) go through the outbox too, throttled to
`training.progress_per_s` (2/s). Measured by bench/bench_outbox.py (2-core Xeon, real nats-server with
`sync_interval: always`): one progress event through the outbox costs ~6 ms wall (two fsyncs: SQLite
and JetStream) and ~1 ms of daemon CPU, against ~0.45 ms wall and ~0.16 ms CPU for a core NATS
publish: 0.2% of a core at 2/s. For that the progress is in the durable event stream like every other
event: the page and `train --follow` can replay a run after a reconnect, a follower that was down
catches up, and a remote worker's progress and the daemon's look the same to a consumer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import nats.errors
import nats.js.errors
import structlog

from academyd.seams import Counters
from academyd.secrets import scanner
from academyd.store import Store

log = structlog.get_logger("academyd.outbox")

PRUNE_EVERY_S = 600.0
COMPONENT = "outbox"

Kind = Literal["transient", "permanent"]

# JetStream error codes (nats-server's JSErrCodes) that no retry changes.
_PERMANENT_ERR_CODES = {
    10054,  # message size exceeds maximum allowed
}


class HealthReport(Protocol):
    def degrade(self, component: str, reason: str, now: datetime) -> None: ...

    def recover(self, component: str) -> None: ...


def classify(exc: BaseException, *, no_stream: bool | None = None) -> Kind:
    """Whether a failed publish is the row's fault (permanent) or the bus's (transient). Pure.

    `no_stream` answers "does no stream capture this subject?" for a publish nobody answered
    (`NoStreamResponseError`): True only when JetStream itself said so; a stream without a leader
    answers nothing either, so an unknown answer (None) is transient."""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return "permanent"
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return "permanent" if no_stream else "transient"
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code in _PERMANENT_ERR_CODES:
            return "permanent"
        return "permanent" if exc.code == 400 else "transient"
    if isinstance(exc, (nats.errors.Error, OSError, asyncio.TimeoutError, ConnectionError)):
        return "transient"
    return "permanent"  # our own error (a payload that cannot be encoded): the same every time


def backoff(failures: int, first_s: float, max_s: float) -> float:
    """Seconds to wait after `failures` transient failures in a row (0: none). Pure."""
    if failures <= 0:
        return first_s
    return min(first_s * 2 ** (failures - 1), max_s)


class OutboxRelay:
    def __init__(
        self,
        store: Store,
        publish: Callable[[str, bytes, str], Any],
        clock: Callable[[], datetime],
        *,
        connected: Callable[[], bool] = lambda: True,
        no_stream: Callable[[str], Awaitable[bool | None]] | None = None,
        health: HealthReport | None = None,
        counters: Counters | None = None,
        max_attempts: int = 10,
        retention: timedelta = timedelta(days=7),
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.store = store
        self.publish = publish
        self.clock = clock
        self.connected = connected
        self.no_stream = no_stream
        self.health = health
        self.max_attempts = max_attempts
        self.retention = retention
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.counters = counters or Counters()
        self.outage_failures = 0  # in a row, in the current outage (0: none)
        self.outage_since: datetime | None = None
        self._kick = asyncio.Event()
        self._last_prune = 0.0

    def kick(self) -> None:
        self._kick.set()

    @property
    def in_outage(self) -> bool:
        return self.outage_failures > 0

    async def flush(self) -> int:
        """Publish everything pending, oldest first. A transient failure ends the pass; a subject with a parked
        or refused row is held back for it. Stops when the bus is disconnected. Returns how many were
        published."""
        sent, after = 0, 0
        held = set(self.store.outbox_parked_subjects())
        transient = False
        while self.connected() and not transient:
            rows = self.store.outbox_pending(100, after_id=after)
            if not rows:
                break
            for row in rows:
                after = row["id"]
                subject = row["subject"]
                if subject in held:
                    continue
                if not self.connected():
                    return sent
                try:
                    await self.publish(subject, public_payload(row["payload"]).encode(), row["msg_id"])
                except Exception as exc:
                    held.add(subject)
                    if not self.connected():  # the connection went: not this row's fault, try it again later
                        log.warning("outbox_publish_interrupted", subject=subject, msg_id=row["msg_id"],
                                    error=str(exc))
                        return sent
                    if await self._failed(row, exc) == "transient":
                        # The bus's trouble, not the row's: every later row would meet it too. Ending the pass
                        # here keeps the order of everything queued during an outage, not only per subject.
                        transient = True
                        break
                    continue
                self.store.outbox_mark_published(row["id"], self.clock())
                sent += 1
                log.info("event_published", subject=subject, event_id=row["msg_id"])
        if transient:
            self.outage_failures += 1
            if self.outage_since is None:
                self.outage_since = self.clock()
        elif self.connected():
            self._outage_over()
        return sent

    async def _failed(self, row: Any, exc: Exception) -> Kind:
        error = f"{type(exc).__name__}: {exc}"
        no_stream = None
        if isinstance(exc, nats.js.errors.NoStreamResponseError) and self.no_stream is not None:
            no_stream = await self.no_stream(row["subject"])
        kind = classify(exc, no_stream=no_stream)
        now = self.clock()
        if kind == "transient":
            self.store.outbox_mark_retrying(row["id"], error, now)
            self.counters.outbox_transient_failures += 1
            log.warning("outbox_outage", subject=row["subject"], msg_id=row["msg_id"], error=error,
                        passes_failed=self.outage_failures + 1)
            if self.health is not None:
                pending = self.store.outbox_counts()["pending"]
                self.health.degrade(COMPONENT, f"JetStream is not taking events ({type(exc).__name__}); "
                                    f"{pending} queued, retried with backoff", now)
            return kind
        parked = self.store.outbox_mark_failed(row["id"], error, now, max_attempts=self.max_attempts)
        log.log(40 if parked else 30, "outbox_parked" if parked else "outbox_publish_refused",
                subject=row["subject"], msg_id=row["msg_id"], attempts=row["attempts"] + 1, error=error)
        return kind

    def _outage_over(self) -> None:
        if self.outage_failures:
            log.info("outbox_outage_over", failures=self.outage_failures,
                     since=self.outage_since.isoformat() if self.outage_since else None)
        self.outage_failures = 0
        self.outage_since = None
        if self.health is not None:
            self.health.recover(COMPONENT)

    def prune(self) -> int:
        """Delete rows published more than `retention` ago."""
        n = self.store.outbox_prune(self.clock() - self.retention)
        if n:
            log.info("outbox_pruned", rows=n)
        return n

    async def run(self, stop: asyncio.Event, idle_s: float = 1.0) -> None:
        loop = asyncio.get_running_loop()
        wait = idle_s
        while not stop.is_set():
            if self.in_outage:  # a kick (a new event) does not cut a backoff short
                await _sleep_unless(stop, wait)
            else:
                try:
                    await asyncio.wait_for(self._kick.wait(), timeout=wait)
                except TimeoutError:
                    pass
            self._kick.clear()
            if stop.is_set():
                return
            await self.flush()
            if self.in_outage:
                wait = backoff(self.outage_failures, self.backoff_s, self.backoff_max_s)
            elif self.store.outbox_counts()["pending"]:
                wait = min(wait * 2, self.backoff_max_s)  # disconnected, or held behind a parked row
            else:
                wait = idle_s
            if loop.time() - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = loop.time()
                self.prune()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


def public_payload(payload: str) -> str:
    """What goes on the bus: the payload with any secret redacted (an error message quoting a trainer's
    output, a reason typed on the page); byte-identical when there is none."""
    import json

    try:
        body = json.loads(payload)
    except ValueError:
        return scanner().redact(payload)
    public = scanner().redact_obj(body)
    return payload if public == body else json.dumps(public, ensure_ascii=False)
