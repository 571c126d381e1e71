"""From raw inbound messages to stored events: decode, validate, handle, all in one transaction.

Pure of NATS: the bus hands over plain `Inbound` values and gets one outcome per message back, then
acks, naks or dead-letters them, after the commit.

One message can cost only itself. The fast path stores a whole batch in one transaction with no
per-message savepoint; when anything in it raises (a handler bug, a row the store refuses), the batch
is redone on the slow path, one savepoint per message, so that the good messages commit and the bad one
gets an outcome of its own. A fault of the store itself (locked, disk I/O, disk full) fails every
message alike: it raises `StoreFault`, and the bus releases the batch for redelivery without counting
those deliveries against the messages.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from academyd.events import describe
from academyd.store import StoreError, StoreFault, probe_write, store_fault
from handlers import Ack, Handler, HandlerContext, Outcome, Reject, Retry, registry
from schemas.models import INBOUND, SCHEMA_VERSION, Event

log = structlog.get_logger("academyd.ingest")

EXCERPT_CHARS = 500
# How long the batch's BEGIN IMMEDIATE may wait for another connection's write lock. Ingest runs on the
# event loop: waiting longer would stall NATS pings and the page; the batch is released instead.
INGEST_BUSY_MS = 1000


@dataclass(frozen=True)
class Inbound:
    subject: str
    data: bytes
    stream_seq: int | None
    num_delivered: int = 1
    msg_id: str | None = None
    # Deliveries that count against the message (num_delivered minus those a store fault caused).
    attempts: int | None = None


# ---------------------------------------------------------------- decoding


class _DuplicateKey(ValueError):
    pass


class _NotJsonConstant(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _DuplicateKey(dup)
    return out


def _refuse_constant(name: str) -> Any:
    raise _NotJsonConstant(name)


def _strict_loads(data: bytes) -> Any:
    """json.loads that refuses what RFC 8259 does not allow and what parsers disagree on."""
    return json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)


_NOT_FINITE = 1 << 40  # added to a key count for NaN/Infinity: the count cannot match, the strict parse decides


def _count_keys(value: Any) -> int:
    """Object keys inside `value`, plus _NOT_FINITE for each NaN/Infinity (pydantic-core accepts them)."""
    kind = type(value)
    if kind is dict:
        n = len(value)
        for v in value.values():
            k = type(v)
            if k is dict or k is list:
                n += _count_keys(v)
            elif k is float and not math.isfinite(v):
                n += _NOT_FINITE
        return n
    if kind is list:
        n = 0
        for v in value:
            k = type(v)
            if k is dict or k is list:
                n += _count_keys(v)
            elif k is float and not math.isfinite(v):
                n += _NOT_FINITE
            elif isinstance(v, BaseModel):
                n += _model_keys(v)
        return n
    if isinstance(value, BaseModel):
        return _model_keys(value)
    return 0


def _model_keys(event: BaseModel) -> int:
    """How many object keys the payload of `event` holds, if it held each key once."""
    fields_set = event.__pydantic_fields_set__
    n = len(fields_set)
    for name in event.NESTED_FIELDS if isinstance(event, Event) else ():
        if name in fields_set:
            value = event.__dict__[name]
            if value:
                n += _count_keys(value)
    return n


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _exc_text(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def decode(item: Inbound, max_payload: int) -> Event | Reject:
    """Parse and validate one message; a Reject says precisely what is wrong with it. Never raises."""
    model = INBOUND.get(item.subject)
    if model is None:
        return Reject("unknown_subject", f"no handler for subject {item.subject!r}")
    data = item.data
    if len(data) > max_payload:
        return Reject("too_large", f"payload is {len(data)} bytes; the limit is {max_payload}")
    try:
        event = model.model_validate_json(data)  # the hot path: one pass, in pydantic-core
    except ValidationError as exc:
        return _explain(data, exc)
    except Exception as exc:  # whatever else the parser meets must cost this message only
        return Reject("undecodable", _exc_text(exc))
    # pydantic-core takes the last of duplicate keys and accepts NaN; a cheap look says whether the
    # strict parse must confirm: the `":` separators do not add up to the keys it kept (a duplicate, or
    # only unusual spacing or a quote in a text), a NaN/Infinity was kept, or a text may hold a NUL.
    if data.count(b'":') != _model_keys(event) or b"\\u0000" in data:
        return _strict(data, event)
    return event


def _strict(data: bytes, event: Event) -> Event | Reject:
    try:
        raw = _strict_loads(data)
    except _DuplicateKey as exc:
        return Reject("duplicate_key", f"key {str(exc)[:100]!r} appears twice in one object; send each key once")
    except _NotJsonConstant as exc:
        return Reject("not_json", f"{exc} is not JSON (RFC 8259); send null or a string instead")
    except Exception as exc:
        return Reject("undecodable", _exc_text(exc))
    if _has_nul(raw):
        return Reject("nul_character", "a string holds a NUL character (\\u0000); remove it")
    return event


def _explain(data: bytes, exc: ValidationError) -> Reject:
    """The slow path: say which kind of poison this is. Never raises."""
    try:
        raw = _strict_loads(data)
    except json.JSONDecodeError as err:
        return Reject("not_json", f"payload is not JSON: {err}; send one JSON object per event")
    except _DuplicateKey as err:
        return Reject("duplicate_key", f"key {str(err)[:100]!r} appears twice in one object; send each key once")
    except _NotJsonConstant as err:
        return Reject("not_json", f"{err} is not JSON (RFC 8259); send null or a string instead")
    except Exception as err:  # invalid UTF-8, nesting too deep (RecursionError), a number too long, ...
        return Reject("undecodable", f"{_exc_text(err)}; send one UTF-8 JSON object per event")
    try:
        invalid = next((e for e in exc.errors() if e["type"] == "json_invalid"), None)
        if invalid is not None:  # Python's parser is laxer (a byte-order mark, ...); the contract's is not
            return Reject("not_json", f"payload is not JSON: {invalid['msg']}; send one JSON object per event")
        if not isinstance(raw, dict):
            return Reject("not_object", f"payload must be a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            return Reject(
                "unknown_schema_version",
                f"schema_version {str(version)[:50]!r} is not supported; this daemon speaks {SCHEMA_VERSION}",
            )
        return Reject("schema_violation", describe(exc, most=5)[:2000])
    except Exception as err:
        return Reject("undecodable", _exc_text(err))


def safe_excerpt(data: bytes) -> str:
    """The start of a rejected payload for the DLQ table and the page, with secrets redacted.

    The scan covers more than the excerpt so that a secret is not cut in half at the edge and missed.
    (The DLQ stream keeps the raw message for replay; it is the copy of what was already on the bus.)
    """
    from academyd.secrets import scanner

    text = data[: EXCERPT_CHARS * 8].decode("utf-8", "replace").replace("\x00", "\\u0000")
    cleaned, _, ok = scanner().clean(text)  # the process's one scanner: safe beside the curator's thread
    return cleaned[:EXCERPT_CHARS] if ok else "(withheld: the payload holds a secret that could not be redacted)"


def event_id_hint(item: Inbound) -> str | None:
    """The event id of a rejected message when one can be read, for logs and the DLQ table."""
    if item.msg_id:
        return item.msg_id[:200]
    try:
        raw = json.loads(item.data)
    except Exception:  # anything: this is only a hint
        return None
    value = raw.get("event_id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and len(value) <= 200 and "\x00" not in value else None


# ---------------------------------------------------------------- the batch


@dataclass
class BatchResult:
    outcomes: list[Outcome]
    stored: dict[str, int]
    duplicates: int
    rejected: int


_SHA = re.compile(r"[0-9a-fA-F]{4,64}")


def known_commits(batch: list[Inbound], repos: dict[str, Any]) -> frozenset[tuple[str, str]]:
    """(repo, sha) of the batch's commit.pushed events whose sha names a commit in the repository's clone:
    one batched `git cat-file` per repository (blocking: run it in a thread). A message that does not
    decode is skipped here; its handler never runs."""
    from academyd.curator.git import existing_commits, open_repo

    wanted: dict[str, set[str]] = {}
    for item in batch:
        if item.subject != "commit.pushed":
            continue
        try:
            body = json.loads(item.data)
            repo, sha = body["repo"], body["sha"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(repo, str) and isinstance(sha, str) and repo in repos and _SHA.fullmatch(sha):
            wanted.setdefault(repo, set()).add(sha)
    found: set[tuple[str, str]] = set()
    for name, shas in wanted.items():
        try:
            clone = open_repo(repos[name])
        except Exception:
            continue  # not a repository (now): every sha of it is "not there yet", as the handler says
        try:
            found.update((name, sha) for sha in existing_commits(clone, sorted(shas)))
        except Exception as exc:
            log.warning("commit_lookup_failed", repo=name, error=_exc_text(exc))
        finally:
            clone.close()
    return frozenset(found)


class _Isolate(Exception):
    """The fast path met an exception it cannot attribute without savepoints: redo the batch slowly."""


class _Undo(Exception):
    """A handler's Retry or Reject: its savepoint is rolled back, the outcome stands."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(type(outcome).__name__)
        self.outcome = outcome


class Ingestor:
    """Writes a batch of inbound messages to the store in one transaction."""

    def __init__(self, store: Any, settings: Any, handlers: dict[str, Handler] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.handlers = handlers or registry()
        self.isolated_batches = 0  # batches redone one savepoint per message (a message raised)

    def process(self, batch: list[Inbound], now: datetime) -> BatchResult:
        """One outcome per message, committed; raises StoreFault (and only that) when the store cannot."""
        result = self._stage(batch, now)
        self._commit()
        return result

    async def process_async(self, batch: list[Inbound], now: datetime) -> BatchResult:
        """As `process`, with the COMMIT (the fsync) on a worker thread: the loop meanwhile receives the
        next batch. Only for a store of its own (no one else may use its connection until this returns).
        The batch's commit.pushed shas are looked up in their clones first, in a thread and before the
        transaction opens: one `git cat-file --batch-check` per repository, not a git process per event
        inside the transaction."""
        known = await asyncio.to_thread(known_commits, batch, self.settings.repos) if any(
            item.subject == "commit.pushed" for item in batch) else None
        result = self._stage(batch, now, known)
        await asyncio.to_thread(self._commit)
        return result

    def _commit(self) -> None:
        try:
            self.store.commit()
        except Exception as exc:
            raise (store_fault(exc) or StoreFault("commit failed", _exc_text(exc))) from exc

    def _stage(self, batch: list[Inbound], now: datetime,
               known: frozenset[tuple[str, str]] | None = None) -> BatchResult:
        """The batch written in an open transaction (the caller commits)."""
        try:
            return self._run(batch, now, isolated=False, known=known)
        except _Isolate:
            pass
        except StoreFault:
            raise
        except Exception as exc:
            fault = store_fault(exc)
            if fault is not None:
                raise fault from exc
            log.warning("batch_isolated", size=len(batch), error=_exc_text(exc))
        self.isolated_batches += 1
        try:
            return self._run(batch, now, isolated=True, known=known)
        except StoreFault:
            raise
        except Exception as exc:
            fault = store_fault(exc)
            raise (fault or StoreFault("store error", _exc_text(exc))) from exc

    def _run(self, batch: list[Inbound], now: datetime, *, isolated: bool,
             known: frozenset[tuple[str, str]] | None = None) -> BatchResult:
        ctx = HandlerContext(store=self.store, settings=self.settings, now=now, known_commits=known)
        outcomes: list[Outcome] = []
        stored: dict[str, int] = {}
        duplicates = rejected = 0
        nats = self.settings.nats
        max_deliver, ceiling = nats.max_deliver, nats.max_deliver + nats.store_fault_redeliveries
        one = self._isolated if isolated else self._fast
        store = self.store
        try:
            store.begin(busy_ms=INGEST_BUSY_MS)
            for item in batch:
                outcome = one(item, ctx)
                if isinstance(outcome, Retry):
                    attempts = item.num_delivered if item.attempts is None else item.attempts
                    if attempts >= max_deliver or item.num_delivered >= ceiling:
                        outcome = Reject(outcome.final_reason, f"{outcome.reason} (after {attempts} tries)")
                if isinstance(outcome, Reject):
                    rejected += 1
                    store.record_dlq(
                        item.subject,
                        outcome.reason,
                        outcome.detail,
                        event_id=event_id_hint(item),
                        stream_seq=item.stream_seq,
                        excerpt=safe_excerpt(item.data),
                        now=now,
                    )
                elif isinstance(outcome, Ack):
                    if outcome.duplicate:
                        duplicates += 1
                    else:
                        stored[item.subject] = stored.get(item.subject, 0) + 1
                outcomes.append(outcome)
        except BaseException as exc:
            store.rollback()
            fault = store_fault(exc)
            if fault is not None:
                raise fault from exc
            raise
        return BatchResult(outcomes, stored, duplicates, rejected)

    def _fast(self, item: Inbound, ctx: HandlerContext) -> Outcome:
        event = decode(item, self.settings.nats.max_payload_bytes)
        if isinstance(event, Reject):
            return event
        handler = self.handlers[item.subject]
        if not getattr(handler, "may_refuse", False):
            # Handlers that only ever Ack need no savepoint (the hot path: lessons, tasks). If one raises,
            # the rows it may have written are in this transaction: the batch is redone isolated.
            try:
                if not self.store.claim(event.event_id, item.subject, item.stream_seq, ctx.now):
                    return Ack(duplicate=True)
                return handler(event, ctx)
            except Exception as exc:
                if store_fault(exc) is not None:
                    raise
                raise _Isolate() from exc
        return self._guarded(item, event, handler, ctx)

    def _isolated(self, item: Inbound, ctx: HandlerContext) -> Outcome:
        event = decode(item, self.settings.nats.max_payload_bytes)
        if isinstance(event, Reject):
            return event
        return self._guarded(item, event, self.handlers[item.subject], ctx)

    def _guarded(self, item: Inbound, event: Event, handler: Handler, ctx: HandlerContext) -> Outcome:
        """The handler inside a savepoint: a Retry, a Reject or an exception leaves no partial rows."""
        try:
            with self.store.transaction():  # nested in the batch's: a savepoint
                if not self.store.claim(event.event_id, item.subject, item.stream_seq, ctx.now):
                    return Ack(duplicate=True)
                outcome = handler(event, ctx)
                if not isinstance(outcome, Ack):
                    raise _Undo(outcome)
        except _Undo as undo:
            return undo.outcome
        except Exception as exc:
            if store_fault(exc) is not None:
                raise  # the store itself is in trouble (disk, lock): the whole batch is released
            return self._failed(item, event, exc)
        return outcome

    def _failed(self, item: Inbound, event: Event, exc: Exception) -> Outcome:
        if isinstance(exc, StoreError):
            # The store refused this one row (a constraint, a value too big): trying again changes nothing.
            log.warning("event_refused_by_store", event_id=event.event_id, subject=item.subject,
                        error=_exc_text(exc))
            return Reject("store_rejected", _exc_text(exc))
        # A bug meeting one message must not block the stream behind it; it may be transient, so the
        # message gets its retries before it is dead-lettered.
        log.warning("handler_failed", event_id=event.event_id, subject=item.subject, error=_exc_text(exc),
                    delivery=item.num_delivered)
        steps = self.settings.nats.backoff_s or [1.0]
        attempt = item.num_delivered if item.attempts is None else item.attempts
        delay = steps[min(max(attempt, 1), len(steps)) - 1]
        return Retry(delay, _exc_text(exc), final_reason="handler_error")

    # ------------------------------------------------------------ health

    def probe(self) -> None:
        """Raise StoreFault unless the store takes a real write now (for a worker thread while degraded):
        a full disk or a held write lock shows here before a batch is fetched again."""
        try:
            probe_write(self.store.path, INGEST_BUSY_MS)
        except StoreError as exc:
            raise (store_fault(exc) or StoreFault("store error", _exc_text(exc))) from exc
