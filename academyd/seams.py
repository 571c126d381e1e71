"""The seams between the daemon's parts: what each needs of the others, as small protocols.

`academyd.app.App` (the composition root) builds the parts and hands each the few capabilities it uses;
nothing below it knows `App`. A part depends on one of these, never on the object behind it:

- `Clock` (academyd.clock): the time; tests pass one they move by hand.
- `EventSink` (academyd.events): queue an outbound event inside the caller's transaction, then `kick`.
- `RunRequests`: ask the policy for a run (academyd.trigger.Trigger).
- `StatusSource`: a part of `academy.status` (academyd.status.StatusBuilder is one, built of others).
- `ChampionMoves`: promote and roll back, compare-and-swap (academyd.champion.Champion).
- `ModelActions`: what an operator asks of the training pipeline (academyd.pipeline.Pipeline).
- `LiveEvents`: the bus events the daemon hears, for the page's live feed.
- `Counters`: what only this process counts (the store counts the rest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from academyd.clock import Clock
from academyd.events import EventSink

__all__ = ["ChampionMoves", "Clock", "Counters", "EventSink", "Listener", "LiveEvents",
           "ModelActions", "RunRequests", "StatusSource"]

Listener = Callable[[str, dict[str, Any]], None]


@runtime_checkable
class RunRequests(Protocol):
    def evaluate(self, trigger: str, *, force: bool = False, reason: str | None = None) -> dict[str, Any]:
        """Run the policy now; record a run (and its event) when it says yes. Returns what happened."""
        ...


@runtime_checkable
class StatusSource(Protocol):
    def status(self) -> dict[str, Any]: ...


@runtime_checkable
class ChampionMoves(Protocol):
    async def promote(self, version: str, *, reason: str = "manual", expected: Any = ...,
                      basis: str | None = None) -> dict[str, Any]: ...

    async def rollback(self, *, reason: str = "manual", expected_from: Any = ...,
                       basis: str | None = None) -> dict[str, Any]: ...


@runtime_checkable
class ModelActions(Protocol):
    async def promote(self, version: str, *, reason: str = "manual") -> dict[str, Any]: ...

    async def rollback(self, *, reason: str = "manual") -> dict[str, Any]: ...

    async def build_dataset(self, reason: str = "manual") -> dict[str, Any]: ...


@runtime_checkable
class LiveEvents(Protocol):
    def add_listener(self, fn: Listener) -> None: ...

    def remove_listener(self, fn: Listener) -> None: ...


@dataclass
class Counters:
    """What only this process knows (/metrics reads it); stored and dead-lettered counts come from the store."""

    duplicates: int = 0
    batches: int = 0
    outbox_transient_failures: int = 0  # publishes the bus failed (an outage), retried; never parked
