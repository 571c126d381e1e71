"""/metrics for the production watch (#20), read from the store at scrape time (no statistics computed
here: the monitor records its latest assessment of each champion in `watch_latest`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

STATES = ("watching", "confirmed", "rolled_back")


def watch_metrics(store: Any) -> Iterator[Metric]:
    if not store.has_table("watch_latest"):
        return
    labels = ["version", "parent"]
    tasks = GaugeMetricFamily("academy_watch_tasks", "Tasks the champion served since its promotion (finished)",
                              labels=labels)
    rate = GaugeMetricFamily("academy_watch_success_rate", "The champion's success rate since its promotion",
                             labels=labels)
    lower = GaugeMetricFamily("academy_watch_confidence_lower", "Lower end of the champion's anytime-valid "
                              "confidence sequence of its success rate", labels=labels)
    upper = GaugeMetricFamily("academy_watch_confidence_upper", "Upper end of the champion's confidence sequence",
                              labels=labels)
    parent = GaugeMetricFamily("academy_watch_parent_success_rate", "The parent's success rate (its record)",
                               labels=labels)
    below = GaugeMetricFamily("academy_watch_rollback_below", "The champion is rolled back when its confidence "
                              "sequence falls below this rate (the parent's lower bound minus the margin)", labels=labels)
    state = GaugeMetricFamily("academy_watch_state", "1 for the watch's state of each champion it assessed",
                              labels=[*labels, "state"])
    for row in store.latest_assessments():
        key = [row["champion"], row["parent"]]
        s = row["stats"]
        tasks.add_metric(key, s.get("tasks") or 0)
        for family, name in ((rate, "rate"), (lower, "cs_lower"), (upper, "cs_upper"), (parent, "parent_rate"),
                             (below, "rollback_below")):
            if s.get(name) is not None:
                family.add_metric(key, float(s[name]))
        for st in STATES:
            state.add_metric([*key, st], 1 if row["state"] == st else 0)
    yield from (tasks, rate, lower, upper, parent, below, state)
    decisions = CounterMetricFamily("academy_watch_decisions", "Promotions the watch decided, per state and cause "
                                    "(durable)", labels=["state", "cause"])
    for (st, cause), n in sorted(store.decision_counts().items()):
        decisions.add_metric([st, cause], n)
    yield decisions
    served = CounterMetricFamily("academy_served_tasks", "Finished tasks per version that served them "
                                 "(context_history.llm_runtime; base: no adapter)", labels=["version"])
    for version, c in sorted(store.attribution_counts().items()):
        served.add_metric([version], c["tasks"])
    yield served
    thumbs = CounterMetricFamily("academy_feedback_thumbs", "Thumbs from Venom's users (feedback.given)",
                                 labels=["rating"])
    for rating, n in sorted(store.thumb_counts().items()):
        thumbs.add_metric([rating], n)
    yield thumbs
