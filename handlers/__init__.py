"""The Academy's inbound handlers (part of the `academyd` project, not a general-purpose package).

One module per subscribed subject. A handler gets a validated model and a `HandlerContext` (the store,
inside the batch's open transaction, the settings and `now`) and returns an outcome: `Ack`,
`Retry(delay_s, reason)` or `Reject(reason, detail)`. Handlers never touch NATS: only `academyd.bus`
acks, naks or terminates, and only after the transaction commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from academyd.settings import Settings
    from academyd.store import Store


@dataclass(frozen=True)
class Ack:
    """Stored (or already stored: `duplicate=True`); the message is acked after commit."""

    duplicate: bool = False


@dataclass(frozen=True)
class Retry:
    """Not yet: nak with this delay. After the last delivery it becomes `Reject(final_reason, reason)`."""

    delay_s: float
    reason: str
    final_reason: str = "retries_exhausted"


@dataclass(frozen=True)
class Reject:
    """Never: dead-letter to `academy.dlq.<subject>` with the reason in headers, then terminate."""

    reason: str
    detail: str = ""


Outcome = Ack | Retry | Reject


@dataclass(frozen=True)
class HandlerContext:
    store: Store
    settings: Settings
    now: datetime
    # (repo name, sha) of the batch's commit.pushed events found in their clones, looked up before the
    # transaction and off the event loop (academyd.ingest); None: the handler asks git itself.
    known_commits: frozenset[tuple[str, str]] | None = None


Handler = Callable[[Any, HandlerContext], Outcome]


def registry() -> dict[str, Handler]:
    """Subject -> handler."""
    from handlers import commit_pushed, feedback_given, lesson_created, prompt_approved, task_completed

    return {
        "lesson.created": lesson_created.handle,
        "commit.pushed": commit_pushed.handle,
        "task.completed": task_completed.handle,
        "feedback.given": feedback_given.handle,
        "prompt.approved": prompt_approved.handle,
    }


__all__ = ["Ack", "Handler", "HandlerContext", "Outcome", "Reject", "Retry", "registry"]
