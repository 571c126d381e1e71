"""/metrics: Prometheus text, read at scrape time from the store (the durable truth, so a restart does not
reset what the store knows), the App's in-process counters and the live feed.

Each WebServer owns a CollectorRegistry of its own (never the global one), so two daemons in one
process, as in tests, do not mix their numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from academyd import __version__
from academyd.dashboard.data import models
from academyd.dashboard.live import LiveFeed
from academyd.dashboard.watch_metrics import watch_metrics
from academyd.health import Health
from academyd.seams import Counters, StatusSource
from academyd.settings import Settings
from academyd.store import ACTIVE_RUN_STATES, RUN_STATES, Store, parse_iso

DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 2 * 3600.0, 4 * 3600.0, 8 * 3600.0, 24 * 3600.0)
TERMINAL_STATES = [s for s in RUN_STATES if s not in ACTIVE_RUN_STATES]


class AcademyCollector:
    def __init__(self, store: Store, settings: Settings, counters: Counters, health: Health, feed: LiveFeed,
                 pipeline: StatusSource | None = None) -> None:
        self.store = store
        self.settings = settings
        self.counters = counters
        self.health = health
        self.pipeline = pipeline
        self.feed = feed
        self.consumer_lag: int | None = None  # set by the handler (an async read) right before a scrape

    def collect(self) -> Iterator[Metric]:
        store = self.store
        yield from self._info()

        ingested = CounterMetricFamily(
            "academy_events_ingested", "Inbound events stored, per subject (durable: rows in the store)",
            labels=["subject"])
        for subject, n in store.counts().items():
            ingested.add_metric([subject], n)
        yield ingested
        dup = CounterMetricFamily("academy_events_duplicate", "Inbound events dropped as duplicates since start")
        dup.add_metric([], self.counters.duplicates)
        yield dup
        batches = CounterMetricFamily("academy_ingest_batches", "Inbound batches stored since start")
        batches.add_metric([], self.counters.batches)
        yield batches

        degraded = GaugeMetricFamily("academy_degraded", "1 while a component is degraded (e.g. the store cannot "
                                     "take writes), per component", labels=["component", "reason"])
        for component, problem in self.health.problems().items():
            degraded.add_metric([component, problem.reason], 1)
        yield degraded
        healthy = GaugeMetricFamily("academy_healthy", "1 when nothing is degraded")
        healthy.add_metric([], 1 if self.health.ok else 0)
        yield healthy
        faults = CounterMetricFamily("academy_degraded_episodes", "Times the daemon became degraded since start")
        faults.add_metric([], self.health.faults)
        yield faults

        dlq = CounterMetricFamily("academy_dlq", "Inbound events dead-lettered, per reason (durable)",
                                  labels=["reason"])
        for reason, n in sorted(store.dlq_by_reason().items()):
            dlq.add_metric([reason], n)
        yield dlq

        runs = CounterMetricFamily("academy_runs", "Training runs that ended, per outcome (durable)",
                                   labels=["outcome"])
        by_state = store.runs_by_state()
        for state in TERMINAL_STATES:
            runs.add_metric([state], by_state.get(state, 0))
        yield runs
        active = GaugeMetricFamily("academy_run_active", "1 while a run is in this state", labels=["state"])
        for state in ACTIVE_RUN_STATES:
            active.add_metric([state], 1 if by_state.get(state) else 0)
        yield active
        yield self._durations(store)
        yield self._verdicts(store)
        yield from self._champion()
        yield from watch_metrics(store)  # the production watch (#20)
        yield from self._policy(store)
        yield from self._live()

        lag = GaugeMetricFamily("academy_consumer_lag",
                                "Inbound messages not yet acknowledged by the daemon's consumer (pending + unacked)")
        if self.consumer_lag is not None:
            lag.add_metric([], self.consumer_lag)
        yield lag

    def _info(self) -> Iterator[Metric]:
        info = InfoMetricFamily("academy_build", "The academyd version")
        info.add_metric([], {"version": __version__})
        yield info

    def _durations(self, store: Any) -> Metric:
        """A histogram built from the runs table: every run that started and ended."""
        durations = []
        for started, ended in store.run_durations():
            a, b = parse_iso(started), parse_iso(ended)
            if a and b:
                durations.append(max(0.0, (b - a).total_seconds()))
        buckets = [(_le(b), sum(1 for d in durations if d <= b)) for b in DURATION_BUCKETS]
        buckets.append(("+Inf", len(durations)))
        h = HistogramMetricFamily("academy_training_duration_seconds",
                                  "Wall time of training runs, from start to end (durable)")
        h.add_metric([], buckets, sum_value=sum(durations))
        return h

    def _verdicts(self, store: Any) -> Metric:
        c = CounterMetricFamily("academy_evaluation_verdicts", "Arena verdicts on candidate adapters",
                                labels=["verdict"])
        counts: dict[str, int] = {"promote": 0, "reject": 0}
        durable = store.verdict_counts()
        for verdict, n in (durable if durable is not None else self.feed.verdicts).items():
            counts[str(verdict)] = counts.get(str(verdict), 0) + int(n)
        for verdict, n in sorted(counts.items()):
            c.add_metric([verdict], n)
        return c

    def _champion(self) -> Iterator[Metric]:
        version = self._champion_version()
        g = GaugeMetricFamily("academy_champion_version",
                              "Number of the champion version (vN -> N); 0 while the base model serves")
        m = re.fullmatch(r"v(\d+)", version or "")
        g.add_metric([], int(m.group(1)) if m else 0)
        yield g
        info = InfoMetricFamily("academy_champion", "The version Venom should be serving")
        info.add_metric([], {"version": version or "base"})
        yield info

    def _champion_version(self) -> str | None:
        try:
            reg = models(self.store, self.settings)
        except Exception:
            reg = {"available": False}
        if reg.get("available"):
            return reg.get("champion")
        if self.pipeline is not None:
            champion = self.pipeline.status().get("champion")
            if isinstance(champion, dict):
                champion = champion.get("version")
            return champion if isinstance(champion, str) else None
        return None

    def _policy(self, store: Any) -> Iterator[Metric]:
        snap = store.snapshot()
        g = GaugeMetricFamily("academy_new_successful_lessons", "Successful lessons since the last training")
        g.add_metric([], snap.new_successful_lessons)
        yield g
        t = GaugeMetricFamily("academy_training_threshold_lessons", "New successful lessons needed to train")
        t.add_metric([], self.settings.policy.min_lessons)
        yield t
        o = GaugeMetricFamily("academy_outbox_pending", "Outbound events not yet published")
        counts = store.outbox_counts()
        o.add_metric([], counts["pending"])
        yield o
        parked = GaugeMetricFamily("academy_outbox_parked", "Outbound events parked after failing too often")
        parked.add_metric([], counts["parked"])
        yield parked
        transient = CounterMetricFamily(
            "academy_outbox_transient_failures", "Publishes JetStream failed (timeout, no leader, lost quorum) since "
            "start: retried with backoff, never parked")
        transient.add_metric([], self.counters.outbox_transient_failures)
        yield transient

    def _live(self) -> Iterator[Metric]:
        seen = CounterMetricFamily("academy_bus_events_seen", "Academy events heard on the bus since start",
                                   labels=["subject"])
        for subject, n in sorted(self.feed.events_seen.items()):
            if subject != "ingest":
                seen.add_metric([subject], n)
        yield seen
        loss = GaugeMetricFamily("academy_training_loss", "Latest training loss of the active run", labels=["run_id"])
        step = GaugeMetricFamily("academy_training_step", "Latest step of the active run", labels=["run_id"])
        run = self.store.active_run()
        point = self.feed.latest(run["run_id"]) if run else None
        if run and point:
            if point.get("loss") is not None:
                loss.add_metric([run["run_id"]], float(point["loss"]))
            step.add_metric([run["run_id"]], float(point.get("step") or 0))
        yield loss
        yield step


def _le(bound: float) -> str:
    return repr(float(bound))


def make_registry(collector: AcademyCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
