"""Whether the daemon is healthy, and if not, why: one place that `academy.status`, `/healthz`,
`/metrics` and systemd's STATUS= all read from.

A component reports a problem (`degrade`) and clears it when it is gone (`recover`); the daemon is
healthy when no problem is left. Time comes in as an argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

log = structlog.get_logger("academyd.health")


@dataclass(frozen=True)
class Problem:
    reason: str
    since: datetime


class Health:
    def __init__(self, announce: Callable[[str], Any] | None = None) -> None:
        self._problems: dict[str, Problem] = {}
        self._announce = announce  # systemd STATUS= text
        self.faults = 0  # times a component became degraded, since start

    @property
    def ok(self) -> bool:
        return not self._problems

    def degrade(self, component: str, reason: str, now: datetime) -> None:
        old = self._problems.get(component)
        if old is not None and old.reason == reason:
            return
        self._problems[component] = Problem(reason, old.since if old else now)
        if old is None:
            self.faults += 1
            log.warning("daemon_degraded", component=component, reason=reason)
        self._say()

    def recover(self, component: str) -> None:
        if self._problems.pop(component, None) is not None:
            log.info("daemon_recovered", component=component)
            self._say()

    def problems(self) -> dict[str, Problem]:
        return dict(self._problems)

    def summary(self) -> str:
        if self.ok:
            return "healthy"
        return "degraded: " + "; ".join(f"{c}: {p.reason}" for c, p in sorted(self._problems.items()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "state": "healthy" if self.ok else "degraded",
            "problems": {c: {"reason": p.reason, "since": p.since.isoformat()} for c, p in self._problems.items()},
        }

    def _say(self) -> None:
        if self._announce is not None:
            self._announce(self.summary())
