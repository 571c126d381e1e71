"""The only module that talks NATS, and the only one that acks.

It connects (embedded or external server, with user/password, token, credentials file or TLS), creates
or binds the streams and the durable pull consumer, fetches inbound batches and hands them to a plain
async callback as `Inbound` values, then acks / naks / dead-letters each message by the outcome it got
back (after the callback's transaction committed). It also publishes durably (JetStream, with
`Nats-Msg-Id`) and serves the `academy` micro service.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BadRequestError, NotFoundError

from academyd.events import dead_letter
from academyd.ingest import Inbound
from academyd.settings import NatsSettings
from academyd.store import StoreFault
from handlers import Ack, Outcome, Reject, Retry

log = structlog.get_logger("academyd.bus")

INBOUND_SUBJECTS = ["lesson.created", "commit.pushed", "task.completed", "feedback.given", "prompt.approved"]
OUTBOUND_SUBJECTS = ["academy.training.>", "academy.dataset.>", "academy.evaluation.>", "model.>"]
DLQ_SUBJECTS = ["academy.dlq.>"]
# Large enough to receive (and dead-letter) an oversized event instead of the server refusing it.
SERVER_MAX_PAYLOAD = 8 * 1024 * 1024

# The DLQ stream drops a second copy of one dead letter (same Nats-Msg-Id) for this long, so that the
# in-line path and the MAX_DELIVERIES backstop never both add one.
DLQ_DUPLICATE_WINDOW_S = 24 * 3600.0
# Backoff while the store is faulted: the batch is naked with this delay and fetching pauses until a
# probe write succeeds (doubling up to the cap).
FAULT_BACKOFF_S = (0.5, 30.0)

BatchCallback = Callable[[list[Inbound]], Awaitable[list[Outcome]]]
Probe = Callable[[], Awaitable[None]]  # raises StoreFault while the store cannot take writes
ExhaustedCallback = Callable[[Inbound], Awaitable[Reject | None]]
RequestHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class BusError(Exception):
    """NATS said no in a way the user must fix (auth, TLS, stream config); the message says how."""


@dataclass
class ConsumeStats:
    fetched: int = 0
    acked: int = 0
    released: int = 0  # naked because the store was faulted (not counted as tries)
    backstop_dead_lettered: int = 0  # dead-lettered from a MAX_DELIVERIES advisory


def connect_options(cfg: NatsSettings, url: str) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],  # one URL or a cluster's, comma-separated
        "name": "academyd",
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "allow_reconnect": True,
        "inbox_prefix": cfg.inbox_prefix,
    }
    if cfg.user is not None:
        opts["user"], opts["password"] = cfg.user, cfg.password
    if cfg.token is not None:
        opts["token"] = cfg.token
    if cfg.creds_file is not None:
        if not cfg.creds_file.is_file():
            raise BusError(f"NATS credentials file {cfg.creds_file} not found; set nats.creds_file to a .creds file")
        opts["user_credentials"] = str(cfg.creds_file)
    if cfg.tls_ca or cfg.tls_cert or url.startswith("tls://"):
        ctx = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
        if cfg.tls_cert and cfg.tls_key:
            ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        opts["tls"] = ctx
    return opts


class Bus:
    def __init__(self, cfg: NatsSettings) -> None:
        self.cfg = cfg
        self.nc: Client | None = None
        self.js: Any = None
        self._puller: Puller | None = None
        self._service: Any = None
        self.stats = ConsumeStats()
        self.connected = asyncio.Event()
        # stream seq -> deliveries a store fault caused (they do not count against the message)
        self._fault_deliveries: dict[int, int] = {}
        self._fault_streak = 0

    # ------------------------------------------------------------ lifecycle

    async def connect(self, url: str, timeout: float = 20.0) -> None:
        """Connect, retrying while the server comes up; an authorization error fails at once."""
        refused: list[str] = []
        connecting: asyncio.Task[Client] | None = None

        async def on_disconnect() -> None:
            self.connected.clear()
            log.warning("nats_disconnected")

        async def on_reconnect() -> None:
            self.connected.set()
            log.info("nats_reconnected")

        async def on_error(exc: Exception) -> None:
            text = str(exc)
            log.warning("nats_error", error=text)
            if "authorization" in text.lower() or "authentication" in text.lower():
                refused.append(text)
                if connecting is not None and self.nc is None:
                    connecting.cancel()

        connecting = asyncio.create_task(nats.connect(
            **connect_options(self.cfg, url),
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        ))
        try:
            self.nc = await asyncio.wait_for(connecting, timeout)
        except (asyncio.CancelledError, TimeoutError, Exception) as exc:
            why = refused[0] if refused else (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            raise BusError(
                f"cannot connect to NATS at {url}: {why}. Check nats.url and the credentials "
                "(user/password, token, creds_file, TLS), or unset nats.url to use the embedded server."
            ) from None
        self.js = self.nc.jetstream(timeout=10)
        self.connected.set()

    async def close(self) -> None:
        if self._service is not None:
            try:
                await self._service.stop()
            except Exception:  # already gone with the connection
                pass
        if self.nc is not None and not self.nc.is_closed:
            # Acks were sent as batches settled; flush them out, then close (drain would wait on the
            # pull subscription's pending fetch for its full timeout).
            try:
                await self.nc.flush(timeout=2)
            except Exception:
                pass
            try:
                await self.nc.close()
            except Exception as exc:  # a transport the server already dropped (TLS) can fail to close
                log.debug("nats_close_failed", error=repr(exc))

    # ------------------------------------------------------------ streams

    async def ensure_streams(self) -> None:
        """Create the inbound, outbound and DLQ streams, or bind to the ones that exist."""
        window = self.cfg.duplicate_window_s
        await self._ensure_stream(
            StreamConfig(
                name=self.cfg.inbound_stream,
                description="Venom's lessons, commits and tasks, as heard by the Academy",
                subjects=INBOUND_SUBJECTS,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=self.cfg.replicas,
                discard=DiscardPolicy.OLD,
                max_age=90 * 24 * 3600,
                duplicate_window=window,
                max_msg_size=SERVER_MAX_PAYLOAD,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=self.cfg.outbound_stream,
                description="What the Academy publishes: datasets, training, evaluation, promotions",
                subjects=OUTBOUND_SUBJECTS,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=self.cfg.replicas,
                max_age=90 * 24 * 3600,
                duplicate_window=window,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=self.cfg.dlq_stream,
                description="Inbound events the Academy rejected, with the reason in headers",
                subjects=DLQ_SUBJECTS,
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=self.cfg.replicas,
                max_age=30 * 24 * 3600,
                duplicate_window=max(window, DLQ_DUPLICATE_WINDOW_S),
            )
        )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            info = await self.js.stream_info(config.name)
        except NotFoundError:
            try:
                await self.js.add_stream(config)
            except BadRequestError as exc:
                raise BusError(
                    f"cannot create stream {config.name} for {config.subjects}: {exc.description}. "
                    "Another stream may already capture these subjects; name it in the settings "
                    "(nats.inbound_stream / outbound_stream / dlq_stream) to bind to it."
                ) from exc
            log.info("stream_created", stream=config.name, subjects=config.subjects)
            return
        missing = set(config.subjects or []) - set(info.config.subjects or [])
        if missing:
            # A stream made by an older daemon lacks the subjects added since (feedback.given, #20): add them.
            try:
                info.config.subjects = [*(info.config.subjects or []), *sorted(missing)]
                await self.js.update_stream(info.config)
                log.info("stream_subjects_added", stream=config.name, added=sorted(missing))
            except Exception as exc:
                log.warning("stream_bound_without_subjects", stream=config.name, missing=sorted(missing),
                            error=repr(exc))
        else:
            log.info("stream_bound", stream=config.name)

    async def bind_consumer(self) -> None:
        """Create (or update) the explicitly configured durable pull consumer and bind to it."""
        cfg = self.cfg
        config = ConsumerConfig(
            durable_name=cfg.consumer,
            description="academyd ingest",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait_s,
            # Tries are counted by the daemon (store-fault deliveries excluded); the server's own limit
            # sits above them and is the backstop for a message that never gets an outcome.
            max_deliver=cfg.max_deliver + cfg.store_fault_redeliveries,
            backoff=cfg.backoff_s or None,
            max_ack_pending=max(1000, cfg.fetch_batch * 4),
            filter_subjects=INBOUND_SUBJECTS,
        )
        try:
            await self.js.add_consumer(cfg.inbound_stream, config)
        except BadRequestError as exc:
            raise BusError(
                f"cannot configure consumer {cfg.consumer} on {cfg.inbound_stream}: {exc.description}"
            ) from exc
        assert self.nc is not None
        self._puller = Puller(self.nc, cfg.inbound_stream, cfg.consumer, cfg.fetch_batch, cfg.fetch_timeout_s)
        await self._puller.start()
        log.info("consumer_bound", consumer=cfg.consumer, stream=cfg.inbound_stream)

    async def consumer_lag(self) -> int | None:
        try:
            info = await self.js.consumer_info(self.cfg.inbound_stream, self.cfg.consumer)
        except Exception:
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    # ------------------------------------------------------------ consuming

    async def consume(self, on_batch: BatchCallback, stop: asyncio.Event, probe: Probe | None = None) -> None:
        """Pull until `stop` is set, the next pull request in flight while a batch is stored (pipelined).

        When stop comes, the batch in hand and what the pull in flight brings are finished and acked, so
        a SIGTERM leaves nothing waiting out its ack timeout. When `on_batch` raises StoreFault, the batch
        (and the one fetched ahead) is naked with a delay, and nothing more is fetched until `probe`
        succeeds: a long fault costs each message a delivery or two, never its tries.
        """
        puller = self._puller
        assert puller is not None, "bind_consumer() first"
        while True:
            msgs = await puller.next_batch(more=not stop.is_set())
            if msgs:
                if not await self._handle(msgs, on_batch):
                    continue
                # The store failed: what is still on its way is released alike, then wait for it to heal.
                more = await puller.drain()
                if more:
                    await self._release(more)
                if probe is not None:
                    await self._until_healthy(probe, stop)
            elif stop.is_set() and puller.idle:
                return

    def _fault_delay(self) -> float:
        first, cap = FAULT_BACKOFF_S
        return min(cap, first * (2 ** min(self._fault_streak, 16)))

    async def _handle(self, msgs: list[Msg], on_batch: BatchCallback) -> bool:
        """Store and settle one batch; True when the store was faulted (the batch was released)."""
        self.stats.fetched += len(msgs)
        batch = [self._inbound(m) for m in msgs]
        try:
            outcomes = await on_batch(batch)
        except StoreFault as fault:
            log.warning("store_fault_batch_released", size=len(msgs), reason=fault.reason, detail=fault.detail,
                        retry_in_s=self._fault_delay())
            await self._release(msgs)
            return True
        except Exception:
            # The ingestor gives every message an outcome of its own; this is a bug after the commit or
            # before it. Nothing is lost: every message comes back (the inbox drops what was stored).
            log.exception("batch_failed", size=len(msgs))
            for m in msgs:
                await _quietly(m.nak(delay=1.0))
            return False
        self._fault_streak = 0
        await self._settle(msgs, batch, outcomes)
        return False

    async def _release(self, msgs: list[Msg]) -> None:
        delay = self._fault_delay()
        for m in msgs:
            seq = _seq(m)
            if seq is not None:
                self._fault_deliveries[seq] = self._fault_deliveries.get(seq, 0) + 1
            await _quietly(m.nak(delay=delay))
        self.stats.released += len(msgs)
        if len(self._fault_deliveries) > 1_000_000:  # messages that vanished from the stream (purged)
            self._fault_deliveries.clear()

    async def _until_healthy(self, probe: Probe, stop: asyncio.Event) -> None:
        while not stop.is_set():
            delay = self._fault_delay()
            self._fault_streak += 1
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                await probe()
            except StoreFault as fault:
                log.warning("store_still_faulted", reason=fault.reason, retry_in_s=self._fault_delay())
                continue
            log.info("store_recovered")
            return

    async def _settle(self, msgs: list[Msg], batch: list[Inbound], outcomes: list[Outcome]) -> None:
        faults = self._fault_deliveries
        for msg, item, outcome in zip(msgs, batch, outcomes, strict=True):
            if isinstance(outcome, Ack):
                await _quietly(msg.ack())
                self.stats.acked += 1
            elif isinstance(outcome, Retry):
                await _quietly(msg.nak(delay=outcome.delay_s))
                continue
            elif isinstance(outcome, Reject):
                if not await self._dead_letter(item, outcome):
                    continue
                await _quietly(msg.term())
            if faults and item.stream_seq is not None:
                faults.pop(item.stream_seq, None)

    def _inbound(self, msg: Msg) -> Inbound:
        item = _inbound(msg)
        if self._fault_deliveries and item.stream_seq is not None:
            released = self._fault_deliveries.get(item.stream_seq, 0)
            if released:
                return Inbound(item.subject, item.data, item.stream_seq, item.num_delivered, item.msg_id,
                               attempts=max(1, item.num_delivered - released))
        return item

    # ------------------------------------------------------------ the MAX_DELIVERIES backstop

    async def watch_max_deliveries(self, on_exhausted: ExhaustedCallback) -> None:
        """Dead-letter what the server stopped delivering (its MAX_DELIVERIES advisory), read by sequence.

        The daemon dead-letters a message at its last try itself; this catches the rest (a message that
        never got an outcome: the process died on it each time, or the dead-letter publish failed at the
        last delivery). `on_exhausted` says why (or None: it was stored after all); the DLQ entry has the
        same Nats-Msg-Id as the in-line one, so one message never gets two.
        """
        assert self.nc is not None
        cfg = self.cfg
        subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{cfg.inbound_stream}.{cfg.consumer}"

        async def on_advisory(msg: Msg) -> None:
            try:
                advisory = json.loads(msg.data)
                seq = int(advisory["stream_seq"])
                deliveries = int(advisory.get("deliveries") or 0)
            except Exception as exc:
                log.warning("max_deliveries_advisory_unreadable", error=repr(exc))
                return
            try:
                raw = await self.js.get_msg(cfg.inbound_stream, seq)
            except NotFoundError:
                log.warning("max_deliveries_message_gone", stream_seq=seq)
                return
            except Exception as exc:
                log.warning("max_deliveries_read_failed", stream_seq=seq, error=repr(exc))
                return
            item = Inbound(subject=raw.subject or "", data=raw.data or b"", stream_seq=seq,
                           num_delivered=deliveries, msg_id=(raw.headers or {}).get("Nats-Msg-Id"))
            try:
                outcome = await on_exhausted(item)
            except Exception:
                log.exception("max_deliveries_backstop_failed", stream_seq=seq)
                outcome = Reject("max_deliveries", f"delivered {deliveries} times without an outcome")
            if outcome is not None and await self._dead_letter(item, outcome):
                self.stats.backstop_dead_lettered += 1
                self._fault_deliveries.pop(seq, None)

        await self.nc.subscribe(subject, cb=on_advisory)

    async def _dead_letter(self, item: Inbound, outcome: Reject) -> bool:
        subject, data, headers = dead_letter(item.subject, item.data, reason=outcome.reason, detail=outcome.detail,
                                             stream=self.cfg.inbound_stream, stream_seq=item.stream_seq)
        try:
            await self.js.publish(subject, data, headers=headers)
        except Exception as exc:
            log.warning("dead_letter_publish_failed", subject=item.subject, error=str(exc))
            return False  # not terminated: it will be redelivered and dead-lettered then
        log.warning(
            "event_dead_lettered", subject=item.subject, stream_seq=item.stream_seq, reason=outcome.reason,
            event_id=item.msg_id,
        )
        return True

    # ------------------------------------------------------------ publishing

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Durable publish: returns once JetStream has stored it (a duplicate msg id is a no-op)."""
        await self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=5)

    async def no_stream(self, subject: str) -> bool | None:
        """Whether JetStream says no stream captures `subject`: True or False when it answered, None when
        it could not (no meta leader, lost quorum, a timeout): a publish nobody answered is then an outage."""
        from nats.js.errors import NotFoundError

        try:
            await self.nc.jetstream(timeout=3).find_stream_name_by_subject(subject)
        except NotFoundError:
            return True
        except Exception:
            return None
        return False

    async def watch(self, subjects: list[str], cb: Callable[[str, bytes], Awaitable[None]]) -> None:
        """Core subscription (no ack) to events for live views: progress from any worker, the DLQ."""
        assert self.nc is not None

        async def on_msg(msg: Msg) -> None:
            await cb(msg.subject, msg.data)

        for subject in subjects:
            await self.nc.subscribe(subject, cb=on_msg)
        await self.nc.flush()  # the server knows the subscriptions before this returns

    # ------------------------------------------------------------ the academy service

    async def serve(self, name: str, version: str, endpoints: dict[str, RequestHandler]) -> None:
        """Serve request/reply endpoints as a `nats.micro` service; `nats pub` (no reply) works too."""
        from nats import micro

        self._service = await micro.add_service(
            self.nc, name=name, version=version, description="The Academy: Venom's learning loop"
        )

        def make(handler: RequestHandler) -> Callable[[Any], Awaitable[None]]:
            async def on_request(req: Any) -> None:
                try:
                    body = json.loads(req.data or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("the request must be a JSON object")
                    reply = await handler(body)
                except ValueError as exc:
                    await _respond(req, {"ok": False, "error": str(exc)}, error=("400", str(exc)))
                    return
                except Exception as exc:
                    log.exception("request_failed", subject=req.subject)
                    await _respond(req, {"ok": False, "error": str(exc)}, error=("500", str(exc)))
                    return
                await _respond(req, reply)

            return on_request

        for subject, handler in endpoints.items():
            await self._service.add_endpoint(
                name=subject.replace(".", "_"), subject=subject, handler=make(handler)
            )
        # A PONG means the server has processed every SUB before it: once serve() returns, a request from
        # any other connection finds its responder (without this, one CI run got "no responders").
        await self.nc.flush()


@dataclass
class _Request:
    remaining: int
    expires_at: float


@dataclass
class _Outage:
    since: float
    failures: int = 0
    not_before: float = 0.0


def backoff_delay(failures: int, first_s: float, max_s: float) -> float:
    """The wait before the next request after `failures` unanswered ones in a row: doubling, capped."""
    return min(max_s, first_s * 2 ** min(max(failures - 1, 0), 30))


class Puller:
    """Pull requests for a durable consumer, answered into one core subscription (JetStream's pull protocol,
    ADR-13: a request on `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` with `batch` and `expires`; the
    messages and a status (404 no messages, 408 expired, 409 ...) go to its reply subject).

    It does what nats-py's `fetch()` does without a timer and a task per message (measured here: about
    twice the messages per second), and keeps one request in flight while the caller stores a batch.
    Requests are answered in order, so a message or a status is counted against the oldest one; a request
    that was lost (a reconnect) is forgotten once it would have expired.

    While no consumer leader answers (503 / no responders during an election, or for as long as quorum is
    lost; any status other than 404/408), or the request cannot be sent (disconnected), the next request
    waits: `backoff_delay` (doubling from 50 ms to 2 s). One warning when such an outage begins, one info
    line when requests are answered again, instead of a line and a new request per answer (thousands a
    second during an election).
    """

    BACKOFF_FIRST_S = 0.05
    BACKOFF_MAX_S = 2.0

    def __init__(self, nc: Client, stream: str, consumer: str, batch: int, expires_s: float) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.batch = batch
        self.expires_s = expires_s
        self.inbox = nc.new_inbox()
        self._buf: list[Msg] = []
        self._ready = asyncio.Event()
        self._requests: list[_Request] = []
        self._sub: Any = None
        self._clock = asyncio.get_running_loop().time
        self._outage: _Outage | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg, pending_msgs_limit=self.batch * 64)

    @property
    def idle(self) -> bool:
        """No request in flight and nothing held: nothing more will arrive."""
        self._forget_lost()
        return not self._requests and not self._buf

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            self._buf.append(msg)
            if self._requests:
                oldest = self._requests[0]
                oldest.remaining -= 1
                if oldest.remaining <= 0:
                    self._requests.pop(0)
            if len(self._buf) >= self.batch or not self._requests:
                self._ready.set()
            self._answered()
            return
        if status == "100":  # idle heartbeat
            return
        if status in ("404", "408"):
            self._answered()
        else:
            self._unanswered(f"status {status}: {(headers or {}).get('Description')}")
        if self._requests:
            self._requests.pop(0)
        self._ready.set()

    def _forget_lost(self) -> None:
        now = self._clock()
        while self._requests and self._requests[0].expires_at < now:
            self._requests.pop(0)

    def _unanswered(self, why: str) -> None:
        now = self._clock()
        if self._outage is None:
            self._outage = _Outage(since=now)
            log.warning("pull_requests_unanswered", reason=why, hint=(
                "no consumer leader answers (an election after a node loss, or quorum lost): asking again "
                f"with backoff up to {self.BACKOFF_MAX_S:g} s; said once until answered again"))
        self._outage.failures += 1
        self._outage.not_before = now + backoff_delay(self._outage.failures, self.BACKOFF_FIRST_S, self.BACKOFF_MAX_S)

    def _answered(self) -> None:
        if self._outage is not None:
            log.info("pull_requests_answered_again", after_s=round(self._clock() - self._outage.since, 2),
                     unanswered=self._outage.failures)
            self._outage = None

    async def _request(self) -> None:
        if self._outage is not None:
            await asyncio.sleep(max(0.0, self._outage.not_before - self._clock()))
        body = b'{"batch":%d,"expires":%d}' % (self.batch, int(self.expires_s * 1e9))
        try:
            await self.nc.publish(self.subject, body, reply=self.inbox)
        except Exception as exc:  # disconnected: the client reconnects by itself; ask again then
            self._unanswered(f"not sent: {type(exc).__name__}: {exc}")
            return
        # Forgotten a little after the server would have expired it (its 408 may be lost in a reconnect).
        self._requests.append(_Request(self.batch, self._clock() + self.expires_s + 1.0))

    async def next_batch(self, *, more: bool = True) -> list[Msg]:
        """What has arrived (waiting up to about `expires_s` for something), with a request in flight
        for the next batch when `more`."""
        self._forget_lost()
        if more and not self._requests:
            await self._request()
        if not self._buf and self._requests:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), self.expires_s + 1.0)
            except TimeoutError:
                pass
        msgs, self._buf = self._buf, []
        self._ready.clear()
        self._forget_lost()
        if more and not self._requests:
            await self._request()  # the next batch arrives while this one is stored
        return msgs

    async def drain(self) -> list[Msg]:
        """Wait until no request is in flight; what arrived meanwhile."""
        out: list[Msg] = []
        while True:
            self._forget_lost()
            out += self._buf
            self._buf = []
            if not self._requests:
                return out
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), self.expires_s + 1.0)
            except TimeoutError:
                pass


async def _respond(req: Any, body: dict[str, Any], error: tuple[str, str] | None = None) -> None:
    if not req._msg.reply:  # a plain `nats pub`: nobody to answer
        return
    data = json.dumps(body, default=str).encode()
    if error is not None:
        await req.respond(data, headers={"Nats-Service-Error-Code": error[0], "Nats-Service-Error": error[1][:200]})
    else:
        await req.respond(data)


def _seq(msg: Msg) -> int | None:
    fields = _ack_fields(msg.reply)
    if fields is not None:
        return fields[0]
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return None


def _ack_fields(reply: str | None) -> tuple[int, int] | None:
    """(stream seq, deliveries) from a JetStream ack subject (ADR-15), without building nats-py's Metadata.

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    """
    if not reply or not reply.startswith("$JS.ACK."):
        return None
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[4])
        if len(tokens) >= 11:
            return int(tokens[7]), int(tokens[6])
    except ValueError:
        return None
    return None


def _inbound(msg: Msg) -> Inbound:
    fields = _ack_fields(msg.reply)
    if fields is not None:
        seq, delivered = fields
    else:
        try:
            md = msg.metadata
            seq, delivered = md.sequence.stream, md.num_delivered
        except Exception:
            seq, delivered = None, 1
    return Inbound(
        subject=msg.subject,
        data=msg.data,
        stream_seq=seq,
        num_delivered=delivered,
        msg_id=(msg.headers or {}).get("Nats-Msg-Id"),
    )


async def _quietly(aw: Awaitable[Any]) -> None:
    """Acks are best-effort: a lost ack means a redelivery, which the inbox turns into a no-op."""
    try:
        await aw
    except Exception as exc:
        log.debug("ack_failed", error=str(exc))


class Feed:
    """A durable pull consumer on the outbound stream for a reader beside the daemon (the follower).

    One message at a time and in stream order (max_ack_pending 1): the handler's outcome decides ack,
    nak(delay) or dead-letter, and while it works (a model swap takes seconds) the message is kept from
    redelivery with progress pings. Only this module acks.
    """

    def __init__(self, bus: Bus, *, durable: str, subjects: list[str], ack_wait_s: float,
                 description: str = "academyd follower") -> None:
        self.bus, self.durable, self.subjects = bus, durable, subjects
        self.ack_wait_s, self.description = ack_wait_s, description
        self._psub: Any = None

    async def bind(self) -> None:
        stream = self.bus.cfg.outbound_stream
        config = ConsumerConfig(
            durable_name=self.durable, description=self.description, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_ack_pending=1,
            filter_subjects=self.subjects,
        )
        try:
            await self.bus.js.add_consumer(stream, config)
        except BadRequestError as exc:
            raise BusError(f"cannot configure consumer {self.durable} on {stream}: {exc.description}") from exc
        self._psub = await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=stream)
        log.info("consumer_bound", consumer=self.durable, stream=stream, subjects=self.subjects)

    async def pending(self) -> int | None:
        try:
            info = await self.bus.js.consumer_info(self.bus.cfg.outbound_stream, self.durable)
        except Exception:
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def run(self, handler: Callable[[Inbound], Awaitable[Outcome]], stop: asyncio.Event) -> None:
        assert self._psub is not None, "bind() first"
        while not stop.is_set():
            try:
                msgs = await self._psub.fetch(1, timeout=self.bus.cfg.fetch_timeout_s)
            except NatsTimeout:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                await self._one(msg, handler)

    async def _one(self, msg: Msg, handler: Callable[[Inbound], Awaitable[Outcome]]) -> None:
        item = _inbound(msg)
        beat = asyncio.create_task(self._keep_alive(msg))
        try:
            outcome = await handler(item)
        except Exception:
            log.exception("feed_handler_failed", subject=item.subject, stream_seq=item.stream_seq)
            outcome = Retry(2.0, "handler_failed")
        finally:
            beat.cancel()
        if isinstance(outcome, Ack):
            await _quietly(msg.ack())
        elif isinstance(outcome, Retry):
            await _quietly(msg.nak(delay=outcome.delay_s))
        elif isinstance(outcome, Reject):  # the handler published why (model.deploy_failed) or logged it
            log.warning("feed_event_rejected", subject=item.subject, stream_seq=item.stream_seq,
                        reason=outcome.reason, detail=outcome.detail[:500])
            await _quietly(msg.term())

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.ack_wait_s / 3))
            await _quietly(msg.in_progress())
