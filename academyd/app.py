"""The composition root: builds the daemon from settings, runs it, stops it in order.

It wires the parts through their seams (academyd.seams): the outbox (`events.Outbox`, the EventSink),
the trigger (`trigger.Trigger`, RunRequests), the champion (ChampionMoves), the pipeline (ModelActions),
the status document (`status.StatusBuilder`), the endpoints (`endpoints.endpoints`) and the page; none of
them knows `App`. The bus's inbound callbacks are `intake.Intake`'s. What stays here: the order of
start and stop, the listeners of the live feed, and the attributes tests and commands read.

Start: store (migrated) -> embedded nats-server (unless a URL is given) -> connect -> streams ->
consumer -> the `academy` service -> scheduler, outbox relay, page -> READY.
Stop (SIGTERM/SIGINT): stop fetching, finish the batch in hand (ack after commit), flush the outbox,
close NATS, stop the embedded server. Time comes from `clock`, so tests drive the policy's clock.
"""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import datetime, timedelta
from typing import Any

import structlog

from academyd import __version__
from academyd.basemodel import BaseModel, resolve_base
from academyd.bus import Bus
from academyd.champion import Champion, Monitor
from academyd.clock import Clock, utcnow
from academyd.dashboard import WebServer
from academyd.embedded import EmbeddedServer
from academyd.endpoints import endpoints
from academyd.events import Outbox
from academyd.health import Health
from academyd.ingest import Ingestor
from academyd.intake import Intake
from academyd.nats_auth import DAEMON, as_identity
from academyd.notify import Notifier
from academyd.outbox import OutboxRelay
from academyd.pipeline import Pipeline
from academyd.seams import Counters, Listener
from academyd.settings import Settings
from academyd.status import StatusBuilder
from academyd.store import Store
from academyd.supervise import supervise, watch_jobs
from academyd.trigger import Trigger

log = structlog.get_logger("academyd.app")

# What the live views (the page, `train --follow`) hear: everything the Academy publishes, and the DLQ.
LIVE_SUBJECTS = ["academy.training.>", "academy.dataset.>", "academy.evaluation.>", "academy.dlq.>", "model.>"]

__all__ = ["App", "Clock", "Counters", "LIVE_SUBJECTS"]


class App:
    def __init__(self, settings: Settings, clock: Clock = utcnow, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.store: Store | None = None
        self.bus = Bus(settings.nats)
        self.embedded: EmbeddedServer | None = None
        self.ingestor: Ingestor | None = None
        self.relay: OutboxRelay | None = None
        self.champion: Champion | None = None
        self.monitor: Monitor | None = None
        self.outbox: Outbox | None = None
        self.trigger: Trigger | None = None
        self.status_builder: StatusBuilder | None = None
        self.intake: Intake | None = None
        self.counters = Counters()
        self.health = Health(announce=self.notifier.status)
        self.stop_event = asyncio.Event()
        self.ready = asyncio.Event()
        self.nats_url: str | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._scheduler: Any = None
        self._listeners: list[Listener] = []
        self.started_at: datetime | None = None
        self.pipeline: Pipeline | None = None
        self.web: WebServer | None = None
        self.base: BaseModel | None = None  # resolved at start when this daemon trains

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.settings
        if s.training.autorun:
            # A missing or unusable base model is an error now, not a failed run hours later.
            from academyd.habitat.process import default_trainer_python  # a habitat's module: when training

            self.base = await asyncio.to_thread(resolve_base, s.training.base_model,
                                                trainer_python=s.training.trainer_python or default_trainer_python())
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store.open(s.db_path)
        # Ingest writes on the loop, one transaction per fetched batch (the next pull is already in
        # flight). Measured: a worker thread for all of it was slower here (GIL contention with the loop);
        # only its COMMIT (the fsync) goes to one, so ingest has a connection of its own.
        self.ingestor = Ingestor(Store(s.db_path), s)
        if s.nats.url:
            self.nats_url = s.nats.url
        else:
            self.embedded = EmbeddedServer(s.nats_dir, s.nats.embedded_port, s.nats.embedded_monitor_port,
                                           s.nats.outbound_stream)
            await self.embedded.start()
            self.nats_url = self.embedded.url
            self.bus.cfg = as_identity(s.nats, DAEMON, self.embedded.passwords[DAEMON])
        self.relay = OutboxRelay(
            self.store, self.bus.publish, self.clock,
            connected=lambda: self.bus.nc is not None and self.bus.nc.is_connected,
            no_stream=self.bus.no_stream, health=self.health, counters=self.counters,
            max_attempts=s.outbox.max_attempts, retention=timedelta(hours=s.outbox.retention_h),
            backoff_s=s.outbox.backoff_s, backoff_max_s=s.outbox.backoff_max_s,
        )
        self.outbox = Outbox(self.store, kick=self.relay.kick)
        self.trigger = Trigger(s, self.store, self.clock, self.outbox)
        self.champion = Champion(self.store, s, self.clock, on_commit=self.relay.kick)
        self.monitor = Monitor(self.store, s, self.clock, self.champion)
        self.intake = Intake(s, self.store, self.ingestor, self.clock, self.health, self.counters, self.trigger,
                             poke_monitor=self.monitor.poke, emit=self._emit)
        await self.bus.connect(self.nats_url)
        await self.bus.ensure_streams()
        await self.bus.bind_consumer()
        await self.bus.watch_max_deliveries(self.intake.on_exhausted)
        self.pipeline = Pipeline(s, self.store, self.clock, self.outbox, self.trigger, self.champion,
                                 nc=self.bus.nc, base=self.base, health=self.health)
        self.trigger.on_request(self.pipeline.wake)
        self.status_builder = StatusBuilder(s, self.store, self.clock, self.health, lambda: self.nats_url)
        from academyd.serving import ServedState

        self.served = ServedState()  # the follower's last report, beside the champion in academy.status
        self.add_listener(self.served.on_event)
        self.status_builder.add(self.pipeline, self.served)
        await self.bus.serve("academy", __version__,
                             endpoints(self.status_builder, self.trigger, self.pipeline, self.champion))
        await self.bus.watch(LIVE_SUBJECTS, self._on_live)
        self._start_scheduler()
        await self._start_extensions()
        sv, relay = s.supervision, self.relay
        self._tasks.append(asyncio.create_task(supervise(
            "outbox", lambda: relay.run(self.stop_event), stop=self.stop_event, health=self.health, clock=self.clock,
            first_s=sv.restart_backoff_s, max_s=sv.restart_backoff_max_s, healthy_after_s=sv.healthy_after_s,
        ), name="outbox"))
        self.relay.kick()  # anything a crash left unpublished goes out now
        self.started_at = self.clock()
        self.ready.set()
        self.notifier.ready(f"listening on {self.nats_url}")
        log.info("daemon_ready", nats_url=self.nats_url, data_dir=str(s.data_dir), version=__version__)
        self.evaluate("startup")

    async def _start_extensions(self) -> None:
        """The training pipeline and the page."""
        assert self.pipeline is not None and self.store is not None and self.status_builder is not None
        assert self.trigger is not None
        await self.pipeline.start()
        if self.settings.http.enabled:
            self.web = WebServer(self.settings, store=self.store, health=self.health, ready=self.ready,
                                 status=self.status_builder, runs=self.trigger, actions=self.pipeline,
                                 pipeline=self.pipeline, live=self, counters=self.counters,
                                 consumer_lag=self.bus.consumer_lag)
            await self.web.start()
            self.status_builder.add(self.web)

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._scheduler.add_job(
            self._tick, "interval", minutes=self.settings.policy.tick_minutes, id="policy", coalesce=True,
            max_instances=1,
        )
        if self.monitor is not None:
            self.monitor.schedule(self._scheduler)  # the post-promotion watch's tick (#20)
        if self.notifier.watchdog_interval_s:
            # systemd's watchdog, pinged from this loop: a wedged event loop pings no more and is restarted.
            self._scheduler.add_job(self._ping_watchdog, "interval", seconds=self.notifier.watchdog_interval_s,
                                    id="systemd-watchdog", coalesce=True, max_instances=1, misfire_grace_time=None)
        watch_jobs(self._scheduler, self.health, self.clock)  # a job that raised: degraded until it runs well
        self._scheduler.start()

    async def _tick(self) -> None:
        self.evaluate("tick")
        if self.monitor is not None:
            self.monitor.poke()

    async def consume(self) -> None:
        assert self.intake is not None
        await self.bus.consume(self.intake.on_batch, self.stop_event, self.intake.probe_store)

    async def run(self, install_signals: bool = True) -> None:
        """Start, consume until SIGTERM/SIGINT (or `request_stop`), then stop cleanly."""
        if install_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            await self.start()
            await self.consume()
        finally:
            await self.stop()

    async def run_once(self) -> None:
        """One cycle for scripts and tests: ingest what is pending, evaluate, publish, exit."""
        await self.start()
        try:
            while True:
                before = self.bus.stats.fetched
                once = asyncio.Event()
                assert self.intake is not None
                task = asyncio.create_task(self.bus.consume(self.intake.on_batch, once, self.intake.probe_store))
                await asyncio.sleep(self.settings.nats.fetch_timeout_s * 2)
                once.set()
                await task
                if self.bus.stats.fetched == before:
                    break
            self.evaluate("once")
            assert self.relay is not None
            await self.relay.flush()
        finally:
            await self.stop()

    def request_stop(self, why: str = "requested") -> None:
        if not self.stop_event.is_set():
            log.info("daemon_stopping", why=why)
            self.notifier.stopping()
            self.stop_event.set()

    async def stop(self) -> None:
        self.stop_event.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        if self.web is not None:
            await self.web.stop()
        if self.pipeline is not None:
            await self.pipeline.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.relay is not None and self.bus.nc is not None and self.bus.nc.is_connected:
            try:
                await asyncio.wait_for(self.relay.flush(), timeout=5)
            except Exception:
                pass  # what is left stays in the outbox for the next start
        await self.bus.close()
        if self.embedded is not None:
            await self.embedded.stop()
        if self.ingestor is not None:
            self.ingestor.store.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        log.info("daemon_stopped")

    async def _ping_watchdog(self) -> None:
        if self.bus.nc is not None and not self.bus.nc.is_closed and not self.stop_event.is_set():
            self.notifier.watchdog()

    # ------------------------------------------------------------ the trigger

    def evaluate(self, trigger: str, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Run the policy now; record a run (and its outbox event) when it says yes (academyd.trigger)."""
        assert self.trigger is not None
        return self.trigger.evaluate(trigger, force=force, reason=reason)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        assert self.status_builder is not None
        return self.status_builder.status()

    # ------------------------------------------------------------ listeners (the page's live feed)

    def add_listener(self, fn: Listener) -> None:
        """`fn(subject, payload)` for every event seen on the bus (LIVE_SUBJECTS, whoever published it:
        this daemon's outbox or a remote training worker), plus "ingest" after each stored batch."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _emit(self, subject: str, data: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(subject, data)
            except Exception:
                log.exception("listener_failed", subject=subject)

    async def _on_live(self, subject: str, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except Exception:  # a dead letter may be anything (nesting deep enough for RecursionError)
            payload = {"raw": data[:500].decode("utf-8", "replace")}
        if not isinstance(payload, dict):
            payload = {"value": payload}
        self._emit(subject, payload)

