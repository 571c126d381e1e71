"""The one place that builds what the Academy publishes.

An outbound event is an envelope (`schema_version`, `event_id`, `at`) around a body, on a subject of
`schemas.models.OUTBOUND`, and it is checked against that subject's pydantic model here, before anything
queues it: an event that does not match its contract raises `EventRefused` (naming the subject, the event
and each bad field) and never reaches the outbox. Queued inside the caller's transaction, the refusal
rolls that transaction back with it, so a state change and its event are recorded together or not at all.

`Store.outbox_add` is the row writer underneath; nothing but this module calls it (a test checks).
The follower, which publishes directly, builds its `model.deployed` / `model.deploy_failed` here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from pydantic import ValidationError

from academyd.clock import iso
from schemas.models import OUTBOUND, SCHEMA_VERSION

ENVELOPE_FIELDS = ("schema_version", "event_id", "at")
DLQ_EXCERPT_BYTES = 64 * 1024  # bytes of a dead letter's payload kept (the rest: `Academy-Truncated`)


class EventRefused(ValueError):
    """An outbound event that does not match its contract (or names no outbound subject): nothing queued."""


@dataclass(frozen=True)
class Envelope:
    subject: str
    msg_id: str  # the outbox row's key and the `Nats-Msg-Id` (the event id unless the caller says otherwise)
    payload: dict[str, Any]

    @property
    def event_id(self) -> str:
        return str(self.payload["event_id"])


def describe(exc: ValidationError, most: int | None = None) -> str:
    """A pydantic error as one line: `field.path: message; ...` (the first `most` errors), never the
    offending value itself. The one formatter of validation errors (events, commands, ingest, imports)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {' '.join(str(e['msg']).split())}"
                     for e in exc.errors()[:most])


def dead_letter_subject(subject: str) -> str:
    """Where a rejected message is kept: the Academy's DLQ stream (`academy.dlq.>`), by its subject."""
    return f"academy.dlq.{subject}"


def dead_letter(subject: str, data: bytes, *, reason: str, detail: str, stream: str,
                stream_seq: int | None) -> tuple[str, bytes, dict[str, str]]:
    """A rejected message as a dead letter: (its DLQ subject `academy.dlq.<subject>`, the payload's first
    DLQ_EXCERPT_BYTES, the headers saying why). The one dead-letter builder (the bus's inbound events,
    a worker's job messages). Its `Nats-Msg-Id` names the message's stream and sequence, so a redelivered
    copy is not dead-lettered twice."""
    headers = {
        "Academy-Reason": reason,
        "Academy-Detail": "".join(c if c.isprintable() else " " for c in detail[:1000]),
        "Academy-Original-Subject": subject,
        "Academy-Stream-Seq": str(stream_seq or 0),
        "Nats-Msg-Id": f"dlq-{stream}-{stream_seq}",
    }
    if len(data) > DLQ_EXCERPT_BYTES:
        headers["Academy-Truncated"] = str(len(data))
        data = data[:DLQ_EXCERPT_BYTES]
    return dead_letter_subject(subject), data, headers


def envelope(subject: str, event_id: str, at: datetime, body: Mapping[str, Any], *,
             msg_id: str | None = None) -> Envelope:
    """The event `subject` carries: the envelope around `body`, validated; raises EventRefused."""
    model = OUTBOUND.get(subject)
    if model is None:
        raise EventRefused(f"{subject!r} is not an outbound subject (schemas.models.OUTBOUND): nothing queued")
    clash = [k for k in ENVELOPE_FIELDS if k in body]
    if clash:
        raise EventRefused(f"{subject} {event_id}: the body sets envelope fields ({', '.join(clash)}); "
                           "they are this module's to write: nothing queued")
    payload = {"schema_version": SCHEMA_VERSION, "event_id": event_id, "at": iso(at), **body}
    try:
        model.model_validate(payload)
    except ValidationError as exc:
        raise EventRefused(f"{subject} {event_id} does not match its contract ({model.__name__}): "
                           f"{describe(exc)}; nothing queued") from None
    return Envelope(subject, msg_id or event_id, payload)


class OutboxWriter(Protocol):
    """What queues a row (academyd.store.Store)."""

    def outbox_add(self, subject: str, payload: dict[str, Any], msg_id: str, now: datetime) -> bool: ...


def enqueue(outbox: OutboxWriter, event: Envelope, now: datetime) -> bool:
    """Queue a built (validated) envelope; call inside the transaction that makes it true. False: a row with
    this msg id is queued already."""
    return outbox.outbox_add(event.subject, event.payload, msg_id=event.msg_id, now=now)


def emit(outbox: OutboxWriter, subject: str, event_id: str, now: datetime, body: Mapping[str, Any], *,
         msg_id: str | None = None) -> Envelope:
    """Build, validate and queue in one call (inside the caller's transaction)."""
    event = envelope(subject, event_id, now, body, msg_id=msg_id)
    enqueue(outbox, event, now)
    return event


@runtime_checkable
class EventSink(Protocol):
    """Where a component's events go: `emit` queues one inside the caller's open transaction (validated:
    EventRefused, nothing queued); `kick` says the transaction committed, so publish soon."""

    def emit(self, subject: str, event_id: str, now: datetime, body: Mapping[str, Any], *,
             msg_id: str | None = None) -> Envelope: ...

    def kick(self) -> None: ...


class Outbox:
    """The daemon's EventSink: rows in the store's outbox table, published by the relay that `kick` wakes."""

    def __init__(self, store: OutboxWriter, kick: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self._kick = kick

    def emit(self, subject: str, event_id: str, now: datetime, body: Mapping[str, Any], *,
             msg_id: str | None = None) -> Envelope:
        return emit(self.store, subject, event_id, now, body, msg_id=msg_id)

    def kick(self) -> None:
        self._kick()
