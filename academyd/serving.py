"""What the serving side says it serves: the last `model.deployed` / `model.deploy_failed` the daemon saw.

The follower (academyd.follower) converges the runtime on the champion and reports every generation it
reaches (`model.deployed`) and every one it cannot (`model.deploy_failed`, with the runtime's reason). The
daemon sees those on the bus; this keeps the last of each so `academy.status` (the page, `academyd status`)
shows the champion and what is served side by side. In memory: after a daemon restart it says "not
reported yet" until the follower's next report.
"""

from __future__ import annotations

from typing import Any

KEYS = ("version", "serving", "generation", "target", "runtime", "reason", "reason_code", "detail", "at",
        "source_subject")


class ServedState:
    """A listener (`App.add_listener`) and a `StatusSource` (`served`)."""

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None

    def on_event(self, subject: str, payload: dict[str, Any]) -> None:
        if subject not in ("model.deployed", "model.deploy_failed") or not isinstance(payload, dict):
            return
        self.last = {"outcome": subject, **{k: payload.get(k) for k in KEYS}}
        if isinstance(self.last.get("detail"), str):
            self.last["detail"] = self.last["detail"][:500]

    def status(self) -> dict[str, Any]:
        return {"served": self.last}
