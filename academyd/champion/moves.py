"""Promotion and rollback: the moves that make a version the champion, so that Venom hot-swaps to it.

One path for every promotion (the pipeline's automatic one, `academyd models promote`, `academy.cmd.promote`)
and every rollback (manual, command, the post-promotion watch):

1. check the version's files: the adapter directory must exist and its manifest hash must equal the
   registered `adapter_sha256` (see academyd.registry), else `PromotionRefused`;
2. write `models/<vN>/Modelfile` (`FROM` the base, `ADAPTER` the GGUF adapter or else the safetensors
   directory, `TEMPLATE` translated from the tokenizer's chat template when it is a known family,
   `PARAMETER` lines from `arena.modelfile_parameters` plus the tokenizer's EOS as a stop) and
   `models/<vN>/adapter.gguf` (in the trainer's environment, where the architecture allows);
3. when `arena.ollama_url` is set, create `venom-adapter-<vN>` through Ollama's HTTP API (blobs, then
   `/api/create`); a failure refuses the promotion (Venom would be told of a model it cannot load);
4. in ONE transaction: the old champion becomes `retired` (`rejected` on a rollback), the version
   `champion`, the `champion` alias moves, the move is recorded (its id is the new `generation` of the
   desired serving state, carried by both events and `academy.status`), and `model.promoted` (plus
   `model.rolled_back` on a rollback) is queued in the outbox;
5. after the commit, `active_adapter.json` is replaced atomically. A crash between 4 and 5 leaves the
   file one version behind until `sync_active_adapter` runs (the pipeline calls it at start).

Rolling back from a version whose ancestors are all gone (v1, or parents rolled back before) returns
Venom to the base model: `model.rolled_back` with `to_version: null`, no `model.promoted` (nothing is
promoted), the alias is cleared and `active_adapter.json` says `"adapter_path": null` ("no adapter").

Steps 1-3 are `academyd.champion.artifacts` (built once per version); the Modelfile text is
academyd.modelfile's, the Ollama client academyd.ollama's, active_adapter.json academyd.active_adapter's.
This module makes the moves, each a compare-and-swap on the champion it was decided against.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import aiohttp
import structlog

from academyd import events
from academyd.active_adapter import active_adapter_doc, summary_metrics, write_active_adapter_async
from academyd.champion.artifacts import prepare
from academyd.champion.errors import PromotionRefused, StaleChampion
from academyd.ollama import OLLAMA_PREFIX
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store

log = structlog.get_logger("academyd.champion")


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""`expected` for a move that does not care which version is champion (tests, a one-off script)."""


def promoted_event(row: dict[str, Any], previous: dict[str, Any] | None, artifacts: dict[str, Any], *,
                   parent: str | None, reason: str, now: datetime, active_adapter_path: str) -> events.Envelope:
    """`model.promoted` for `row` (validated: EventRefused before anything moves)."""
    event_id = f"promoted-{row['version']}-{uuid.uuid4().hex[:8]}"
    if previous is not None:
        champion_metrics = summary_metrics(previous)
    else:  # against the base model: the champion side of this version's own evaluation
        champion_metrics = summary_metrics(row, side="champion")
    return events.envelope("model.promoted", event_id, now, {
        "version": row["version"],
        "parent_version": parent,
        "base_model": row["base_model"],
        "adapter_path": row["adapter_path"],
        "adapter_sha256": row["adapter_sha256"],
        "modelfile_path": artifacts["modelfile_path"],
        "ollama_model": OLLAMA_PREFIX + row["version"],
        "metrics": summary_metrics(row),
        "champion_metrics": champion_metrics,
        "reason": reason,
        "previous_version": previous["version"] if previous else None,
        "gguf_path": artifacts.get("gguf_path"),
        "base_sha256": artifacts.get("base_sha256"),
        "base_gguf": artifacts.get("base_gguf"),
        "probes_path": artifacts.get("probes_path"),
        "ollama_created": bool(artifacts.get("ollama")),
        "active_adapter_path": active_adapter_path,
        "dataset_id": row.get("dataset_id"),
    })


def _base(version: str | None) -> str:
    return version or "the base model"


def _compare_and_swap(store: Store, expected: Any, *, action: str, to: str | None, basis: str | None, reason: str,
                      now: datetime) -> str | None:
    """Inside the move's transaction: refuse unless the champion is still `expected` (ANY: whatever it is),
    and record the move (`champion_moves`); a `basis` (the verdict or watch decision acted on) can be used
    once. Returns the champion the move starts from."""
    actual = store.champion_version()
    if expected is not ANY and actual != expected:
        raise StaleChampion(
            f"{action} to {_base(to)} refused: it was decided against {_base(expected)}, but the champion is now "
            f"{_base(actual)} (another promotion or rollback came first); nothing changed", expected=expected,
            actual=actual)
    if not store.record_champion_move(action=action, from_version=actual, to_version=to, basis=basis, reason=reason,
                                      now=now):
        raise PromotionRefused(f"{action} refused: {basis} was already acted on; nothing changed")
    return actual


async def promote(store: Store, settings: Settings, version: str, *, reason: str, now: datetime,
                  http_session: aiohttp.ClientSession | None = None, expected_champion: Any = ANY,
                  basis: str | None = None) -> dict[str, Any]:
    """Make `version` the champion; return the `model.promoted` payload (also queued in the outbox).

    Compare-and-swap: with `expected_champion` (a version, or None for the base model) the move happens
    only if that is still the champion when it commits (else StaleChampion); `basis` (a verdict's event
    id) can be acted on once. The slow part (file checks, GGUF export, Ollama) runs before and off the
    loop; the move itself is one short transaction.

    Raises PromotionRefused when the version is unknown, already the champion, its files are missing or
    changed, or Ollama (when configured) cannot create the model. Nothing changes in that case.
    """
    reg = Registry(store, settings)
    row = reg.get(version)
    if row is None:
        raise PromotionRefused(f"no version {version} in the registry; see `academyd models list`")
    if row["is_champion"]:
        raise PromotionRefused(f"{version} is already the champion")
    current = store.champion_version()
    if expected_champion is not ANY and current != expected_champion:
        raise StaleChampion(f"promotion of {version} refused: it was decided against {_base(expected_champion)}, "
                            f"but the champion is now {_base(current)}; nothing changed",
                            expected=expected_champion, actual=current)
    artifacts = await prepare(settings, row, http_session, store)
    previous = reg.champion()
    if previous is not None and previous["version"] == version:
        raise PromotionRefused(f"{version} is already the champion")
    event = promoted_event(row, previous, artifacts, parent=row["parent"], reason=reason, now=now,
                           active_adapter_path=str(settings.active_adapter_path))
    payload = event.payload
    with store.transaction():
        _compare_and_swap(store, expected_champion, action="promote", to=version, basis=basis, reason=reason,
                          now=now)
        payload["generation"] = store.champion_generation()  # this move's: the follower's desired state
        if previous is not None:
            store.set_model_status(previous["version"], "retired")
            store.add_model_history(previous["version"], "retired", f"{version} promoted", now)
        store.make_champion(version, dict(artifacts), now)
        store.add_model_history(version, "promoted", reason, now)
        events.enqueue(store, event, now)
    promoted = reg.get(version)
    await write_active_adapter_async(settings, active_adapter_doc(promoted, base_model=row["base_model"],
                                                                  reason=reason, now=now, payload=payload))
    log.info("model.promoted", version=version, previous=previous["version"] if previous else None, reason=reason)
    return payload


def rollback_target(reg: Registry, champion: dict[str, Any]) -> dict[str, Any] | None:
    """The version a rollback from `champion` restores: its nearest ancestor not itself rolled back
    (status `rejected`); None: the base model."""
    parent = champion.get("parent")
    while parent is not None:
        row = reg.get(parent)
        if row is None:
            return None
        if row["status"] != "rejected":
            return row
        parent = row.get("parent")
    return None


async def rollback(store: Store, settings: Settings, *, reason: str, now: datetime,
                   http_session: aiohttp.ClientSession | None = None, expected_from: Any = ANY,
                   basis: str | None = None) -> dict[str, Any]:
    """Bring the champion's parent back (see `rollback_target`); return the `model.rolled_back` payload
    (from_version, to_version, reason, ...) plus "rolled_back" (that payload again) and "promoted" (the
    `model.promoted` payload of the restored version, or None for the base model).

    The rolled-back version becomes `rejected`. Both events are queued in one transaction. Rolling back to
    the base model queues only `model.rolled_back` (to_version null). Raises PromotionRefused when there is
    no champion, or the parent's files are missing or changed (nothing changes then).

    Compare-and-swap: the rollback is computed from the champion it finds (or `expected_from`, which must
    still be the champion) and commits only if that is still the champion after the slow preparation
    (else StaleChampion): two rollbacks decided on one champion make one move. `basis` (a watch decision)
    can be acted on once.
    """
    reg = Registry(store, settings)
    champ = reg.champion()
    if expected_from is not ANY and (champ["version"] if champ else None) != expected_from:
        actual = champ["version"] if champ else None
        raise StaleChampion(f"rollback refused: it was decided against {_base(expected_from)}, but the champion is "
                            f"now {_base(actual)}; nothing changed", expected=expected_from, actual=actual)
    if champ is None:
        raise PromotionRefused("there is no champion to roll back from: Venom already runs the base model")
    target = rollback_target(reg, champ)
    artifacts = await prepare(settings, target, http_session, store) if target is not None else None
    rb_id = f"rolledback-{champ['version']}-{uuid.uuid4().hex[:8]}"
    rolled_event = events.envelope("model.rolled_back", rb_id, now, {
        "from_version": champ["version"], "to_version": target["version"] if target else None, "reason": reason,
        "active_adapter_path": str(settings.active_adapter_path), "base_model": champ["base_model"]})
    rolled = rolled_event.payload
    promoted_ev = None
    if target is not None and artifacts is not None:
        promoted_ev = promoted_event(target, champ, artifacts, parent=target["parent"],
                                     reason=f"rollback from {champ['version']}: {reason}", now=now,
                                     active_adapter_path=str(settings.active_adapter_path))
    promoted = promoted_ev.payload if promoted_ev is not None else None
    with store.transaction():
        _compare_and_swap(store, champ["version"], action="rollback", to=rolled["to_version"], basis=basis,
                          reason=reason, now=now)
        generation = store.champion_generation()  # one move: both events carry its generation
        rolled["generation"] = generation
        if promoted is not None:
            promoted["generation"] = generation
        store.set_model_status(champ["version"], "rejected")
        store.add_model_history(champ["version"], "rolled_back", reason, now)
        events.enqueue(store, rolled_event, now)
        if target is not None and promoted_ev is not None and artifacts is not None:
            store.make_champion(target["version"], dict(artifacts), now)
            store.add_model_history(target["version"], "promoted", f"rollback from {champ['version']}: {reason}",
                                    now)
            events.enqueue(store, promoted_ev, now)
        else:
            store.clear_champion()
    restored = reg.get(target["version"]) if target else None
    await write_active_adapter_async(settings, active_adapter_doc(
        restored, base_model=champ["base_model"], reason=f"rollback from {champ['version']}: {reason}", now=now,
        payload=promoted))
    log.info("model.rolled_back", from_version=champ["version"], to_version=rolled["to_version"], reason=reason)
    return {**rolled, "rolled_back": rolled, "promoted": promoted}
