"""Promotion and rollback: make a version the champion, so that Venom hot-swaps to it.

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
   `champion`, the `champion` alias moves, and `model.promoted` (plus `model.rolled_back` on a
   rollback) is queued in the outbox;
5. after the commit, `active_adapter.json` is replaced atomically. A crash between 4 and 5 leaves the
   file one version behind until `sync_active_adapter` runs (the pipeline calls it at start).

Rolling back from a version whose ancestors are all gone (v1, or parents rolled back before) returns
Venom to the base model: `model.rolled_back` with `to_version: null`, no `model.promoted` (nothing is
promoted), the alias is cleared and `active_adapter.json` says `"adapter_path": null` ("no adapter").

The Modelfile text is academyd.modelfile's, the Ollama client academyd.ollama's, active_adapter.json
academyd.active_adapter's; this module builds a version's artifacts once and makes the moves.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from academyd import events
from academyd.active_adapter import (
    METRIC_KEYS,
    active_adapter_doc,
    summary_metrics,
    sync_active_adapter,
    sync_active_adapter_async,
    write_active_adapter,
    write_active_adapter_async,
)
from academyd.files import atomic_write_text, copy_durably, replace_durably
from academyd.modelfile import (
    ALPACA_TEMPLATE,
    OLLAMA_TEMPLATES,
    default_system,
    model_parameters,
    modelfile_text,
    ollama_template,
    tokenizer_facts,
)
from academyd.ollama import OLLAMA_PREFIX, OllamaError, ollama_create
from academyd.registry import MANIFEST_FILE, Registry, RegistryError, adapter_sha256
from academyd.settings import Settings
from academyd.store import Store

log = structlog.get_logger("academyd.promotion")

# Moved to their own modules (academyd.modelfile, academyd.ollama, academyd.active_adapter); still
# importable from here.
__all__ = ["ALPACA_TEMPLATE", "ANY", "METRIC_KEYS", "OLLAMA_PREFIX", "OLLAMA_TEMPLATES", "OllamaError",
           "PromotionRefused", "StaleChampion", "active_adapter_doc", "build_artifacts", "default_system",
           "model_parameters", "modelfile_text", "ollama_create", "ollama_template", "promote", "promoted_event",
           "reusable_artifacts", "rollback", "rollback_target", "summary_metrics", "sync_active_adapter",
           "sync_active_adapter_async", "tokenizer_facts", "verify_files", "write_active_adapter",
           "write_active_adapter_async"]

class PromotionRefused(Exception):
    """The promotion or rollback was not done; the message says what is wrong and what to do."""


class StaleChampion(PromotionRefused):
    """The champion is no longer the one the decision was made against (another move came first)."""

    def __init__(self, message: str, *, expected: str | None, actual: str | None) -> None:
        super().__init__(message)
        self.expected, self.actual = expected, actual


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""`expected` for a move that does not care which version is champion (tests, a one-off script)."""


# ---------------------------------------------------------------- files


def verify_files(row: dict[str, Any]) -> None:
    """Refuse a version whose adapter is missing or whose checksum does not match the registry's."""
    adapter = Path(row["adapter_path"])
    if not (adapter / "adapter_config.json").is_file():
        raise PromotionRefused(f"{row['version']}: adapter files are missing at {adapter}; restore them from a "
                               "backup or train again")
    try:
        digest = adapter_sha256(adapter)
    except (RegistryError, OSError) as exc:
        raise PromotionRefused(f"{row['version']}: cannot read the adapter: {exc}") from None
    if digest != row["adapter_sha256"]:
        raise PromotionRefused(f"{row['version']}: adapter checksum mismatch (registered {row['adapter_sha256'][:16]}..., "
                               f"found {digest[:16]}...): the files at {adapter} changed since registration; "
                               f"compare with {adapter.parent / MANIFEST_FILE} (sha256sum -c)")


def _trained_render(row: dict[str, Any]) -> str:
    """How the adapter's examples were rendered ("chat" or "plain"), from the run's summary.json."""
    try:
        summary = json.loads((Path(row["adapter_path"]).parent / "summary.json").read_text())
    except (OSError, ValueError):
        return "chat"
    return str(summary.get("render") or (summary.get("spec") or {}).get("render") or "plain")


async def build_artifacts(settings: Settings, row: dict[str, Any]) -> dict[str, Any]:
    """Write the GGUF adapter (where possible) and the Modelfile of a version; return what was written.

    The GGUF records its base (academyd.arena.export_gguf --base) and is checked against the base GGUF
    before anything is written that names it: a mismatch refuses the promotion, naming both."""
    from academyd.arena.contest import ArenaError, run_trainer_module
    from academyd.basemodel import BaseModelError, check_adapter_base, resolve_base

    vdir = settings.models_dir / row["version"]
    adapter = Path(row["adapter_path"])
    gguf_path: Path | None = None
    notes: list[str] = []
    try:
        base = resolve_base(row["base_model"])
    except BaseModelError as exc:
        base = None
        notes.append(f"base model not resolvable here: {exc}")
    if not settings.arena.gguf:
        notes.append("GGUF export disabled (arena.gguf = false)")
    elif base is None:
        notes.append(f"no GGUF adapter: the base model {row['base_model']} cannot be resolved")
    elif (vdir / "arena" / "candidate.gguf").is_file():
        # The very file the arena judged in llama.cpp (and whose sha256 its probes.json records); off the loop.
        await asyncio.to_thread(copy_durably, vdir / "arena" / "candidate.gguf", vdir / "adapter.gguf")
        gguf_path = vdir / "adapter.gguf"
        notes.append("GGUF adapter: the one the arena measured in llama.cpp")
    else:
        tmp = vdir / f".adapter.gguf.tmp-{uuid.uuid4().hex[:8]}"  # two exports at once never share a file
        try:
            await run_trainer_module(settings, "academyd.arena.export_gguf",
                                     [str(adapter), str(tmp), "--base", row["base_model"]],
                                     time_limit_s=600, what="the GGUF export")
            await asyncio.to_thread(replace_durably, tmp, vdir / "adapter.gguf")
            gguf_path = vdir / "adapter.gguf"
        except ArenaError as exc:
            notes.append(f"no GGUF adapter: {exc}")
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
    if gguf_path is not None and base is not None:
        try:
            check_adapter_base(gguf_path, base)
        except BaseModelError as exc:
            raise PromotionRefused(f"{row['version']}: {exc}") from None
    facts = await asyncio.to_thread(tokenizer_facts, adapter)
    render = _trained_render(row)
    if render == "plain" and row.get("dataset_format") == "alpaca":
        family, template, turn_stop = "alpaca", ALPACA_TEMPLATE, None
        notes.append("TEMPLATE: Venom's ### Instruction prompt, the form this adapter was trained with "
                     "(training.render = plain)")
    else:
        family, template, turn_stop = ollama_template(facts["chat_template"])
        if template is None:
            notes.append("no TEMPLATE: the chat template the adapter was trained with is not a family Ollama's "
                         "templates are known for here; Ollama uses the base GGUF's own")
        else:
            notes.append(f"TEMPLATE: the base model's chat template ({family}), which the adapter was trained with")
    system = default_system(facts["chat_template"]) if family != "alpaca" else None
    params = model_parameters(settings, turn_stop, facts["eos_token"])
    from_ = settings.arena.ollama_base or (base.gguf if base is not None and base.gguf else row["base_model"])
    modelfile = vdir / "Modelfile"
    text = modelfile_text(from_=from_, adapter=gguf_path or adapter, template=template, parameters=params,
                          version=row["version"], family=family, system=system)
    await asyncio.to_thread(atomic_write_text, modelfile, text)
    probes = vdir / "arena" / "probes.json"
    return {"modelfile_path": str(modelfile), "gguf_path": str(gguf_path) if gguf_path else None,
            "template_family": family, "template": template, "parameters": params, "from": from_,
            "system": system, "base_sha256": base.sha256 if base is not None else None,
            "base_gguf": base.gguf if base is not None else None,
            "probes_path": str(probes) if probes.is_file() else None, "notes": notes,
            "adapter_sha256": row["adapter_sha256"], "gguf": settings.arena.gguf}


def reusable_artifacts(settings: Settings, row: dict[str, Any]) -> dict[str, Any] | None:
    """The artifacts an earlier promotion of this version built, when they are still there and were
    built from the same adapter with the same GGUF setting: built once per version, not per move."""
    a = row.get("artifacts") or {}
    if not a or a.get("adapter_sha256") != row["adapter_sha256"] or a.get("gguf") != settings.arena.gguf:
        return None
    if "template" not in a or not Path(a.get("modelfile_path") or "").is_file():
        return None
    if a.get("gguf_path") and not Path(a["gguf_path"]).is_file():
        return None
    return {k: v for k, v in a.items() if k != "ollama"}


# ---------------------------------------------------------------- payloads and active_adapter.json


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


# ---------------------------------------------------------------- promote / rollback


async def _prepare(settings: Settings, row: dict[str, Any], http_session: aiohttp.ClientSession | None,
                   store: Store | None = None) -> dict[str, Any]:
    await asyncio.to_thread(verify_files, row)  # hashes every adapter file: off the loop
    artifacts = reusable_artifacts(settings, row)
    if artifacts is None:
        artifacts = await build_artifacts(settings, row)
        if store is not None:  # built once per version: a later move of it reuses them
            with store.transaction():
                store.set_model_artifacts(row["version"], _artifacts_record(artifacts))
    if settings.arena.ollama_url:
        try:
            artifacts["ollama"] = await ollama_create(settings, row, artifacts, http_session=http_session)
        except OllamaError as exc:
            raise PromotionRefused(f"{row['version']}: {exc}; fix Ollama (or unset arena.ollama_url) and promote "
                                   "again") from None
    return artifacts


def _artifacts_record(artifacts: dict[str, Any]) -> dict[str, Any]:
    return dict(artifacts)


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
    artifacts = await _prepare(settings, row, http_session, store)
    previous = reg.champion()
    if previous is not None and previous["version"] == version:
        raise PromotionRefused(f"{version} is already the champion")
    event = promoted_event(row, previous, artifacts, parent=row["parent"], reason=reason, now=now,
                           active_adapter_path=str(settings.active_adapter_path))
    payload = event.payload
    with store.transaction():
        _compare_and_swap(store, expected_champion, action="promote", to=version, basis=basis, reason=reason,
                          now=now)
        if previous is not None:
            store.set_model_status(previous["version"], "retired")
            store.add_model_history(previous["version"], "retired", f"{version} promoted", now)
        store.make_champion(version, _artifacts_record(artifacts), now)
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
    artifacts = await _prepare(settings, target, http_session, store) if target is not None else None
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
        store.set_model_status(champ["version"], "rejected")
        store.add_model_history(champ["version"], "rolled_back", reason, now)
        events.enqueue(store, rolled_event, now)
        if target is not None and promoted_ev is not None and artifacts is not None:
            store.make_champion(target["version"], _artifacts_record(artifacts), now)
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
