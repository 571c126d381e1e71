"""`academy.status` (the command, the page's /api/status): what the daemon knows, in one document.

Built from the store, the policy's decision and the health, plus the parts other components add
(`StatusSource`s: the pipeline's training and champion, the page's address). Read without a token, so
every value goes through the secret scanner's redaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from academyd import __version__, policy
from academyd.clock import Clock, iso
from academyd.health import Health
from academyd.seams import StatusSource
from academyd.secrets import redact_obj
from academyd.settings import Settings
from academyd.store import Store


class StatusBuilder:
    def __init__(self, settings: Settings, store: Store, clock: Clock, health: Health,
                 nats_url: Callable[[], str | None]) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.health = health
        self.nats_url = nats_url
        self.parts: list[StatusSource] = []

    def add(self, *parts: StatusSource) -> None:
        self.parts.extend(parts)

    def status(self) -> dict[str, Any]:
        store, now = self.store, self.clock()
        snap = store.snapshot()
        p = self.settings.policy
        decision = policy.decide(p, snap, now)
        out: dict[str, Any] = {
            "version": __version__,
            "health": self.health.as_dict(),
            "now": iso(now),
            "nats_url": self.nats_url(),
            "counts": store.counts(),
            "successful_lessons": store.successful_lessons(),
            "threshold": {
                "new_successful_lessons": snap.new_successful_lessons,
                "min_lessons": p.min_lessons,
                "min_interval_h": p.min_interval_h,
                "last_training_ended": iso(snap.last_training_ended),
                "quiet_hours": (
                    f"{p.quiet_hours.start:%H:%M}-{p.quiet_hours.end:%H:%M}" if p.quiet_hours else None
                ),
                "consecutive_failures": snap.consecutive_failures,
            },
            "next_eligible": iso(decision.next_eligible) if decision.next_eligible else iso(now),
            "decision": {"train": decision.train, "reason": decision.reason},
            "active_run": store.active_run(),
            "last_run": next(iter(store.recent_runs(1)), None),
            "last_verdict": last_verdict(store),
            "dlq": {"count": store.dlq_count(), "by_reason": store.dlq_by_reason()},
            "outbox_pending": store.outbox_counts()["pending"],
            "outbox_parked": store.outbox_parked(20),
        }
        for part in self.parts:
            out.update(part.status())
        result: dict[str, Any] = redact_obj(out)  # read without a token (the page, `academy.status`)
        return result


def last_verdict(store: Any) -> dict[str, Any] | None:
    """The newest evaluated version's verdict, in short; `evidence` says how many more lessons a verdict needs
    when the last one ended in "insufficient evidence"."""
    for row in reversed(store.list_versions()):
        verdict = row.get("verdict")
        if not verdict:
            continue
        metrics = verdict.get("metrics") or {}
        evidence = metrics.get("evidence") or {}
        out = {"version": row["version"], "verdict": verdict.get("verdict"),
               "insufficient_evidence": evidence.get("heldout_families", 1) < evidence.get("needed", 0),
               "evidence": evidence or None, "right_answers": metrics.get("right_answers"),
               "reasons": list(verdict.get("reasons") or [])[:12]}
        return out
    return None
