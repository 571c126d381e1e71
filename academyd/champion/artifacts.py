"""A version's serving artifacts, built once per version: its files checked against the registry, the GGUF
adapter (the very file the arena judged in llama.cpp, or exported now) checked against its base, the
Modelfile, and the Ollama model when one is configured. `prepare` is the slow part of every move; it runs
before the move's transaction, off the loop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from academyd.champion.errors import PromotionRefused
from academyd.files import atomic_write_text, copy_durably, replace_durably
from academyd.modelfile import (
    ALPACA_TEMPLATE,
    default_system,
    model_parameters,
    modelfile_text,
    ollama_template,
    tokenizer_facts,
)
from academyd.ollama import OllamaError, ollama_create
from academyd.registry import MANIFEST_FILE, RegistryError, adapter_sha256
from academyd.settings import Settings
from academyd.store import Store


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


def trained_render(row: dict[str, Any]) -> str:
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
    render = trained_render(row)
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


async def prepare(settings: Settings, row: dict[str, Any], http_session: aiohttp.ClientSession | None,
                   store: Store | None = None) -> dict[str, Any]:
    await asyncio.to_thread(verify_files, row)  # hashes every adapter file: off the loop
    artifacts = reusable_artifacts(settings, row)
    if artifacts is None:
        artifacts = await build_artifacts(settings, row)
        if store is not None:  # built once per version: a later move of it reuses them
            with store.transaction():
                store.set_model_artifacts(row["version"], dict(artifacts))
    if settings.arena.ollama_url:
        refused_by = await _refuses_adapter_models(settings, http_session)
        if refused_by is not None:
            # Ollama 0.34.1 and later create no adapter model: a promotion does not fail on it; the follower's
            # ollama target serves the version merged into the base (docs/follower.md).
            structlog.get_logger("academyd.champion").warning(
                "ollama_model_not_created", version=row["version"], ollama_version=refused_by,
                why="Ollama creates no adapter models from 0.34.1 on; `academyd follow` with follower.target = "
                    "ollama serves this version merged into the base")
            return artifacts
        try:
            artifacts["ollama"] = await ollama_create(settings, row, artifacts, http_session=http_session)
        except OllamaError as exc:
            raise PromotionRefused(f"{row['version']}: {exc}; fix Ollama (or unset arena.ollama_url) and promote "
                                   "again") from None
    return artifacts


async def _refuses_adapter_models(settings: Settings, http_session: aiohttp.ClientSession | None) -> str | None:
    """Ollama's version when it is one that refuses adapter models (0.34.1 and later); None otherwise, or
    when it does not say (the create then answers for itself)."""
    from academyd.ollama import creates_adapters, ollama_version

    session = http_session or aiohttp.ClientSession()
    try:
        version = await ollama_version(session, (settings.arena.ollama_url or "").rstrip("/"),
                                       settings.arena.ollama_timeout_s)
    except OllamaError:
        return None
    finally:
        if http_session is None:
            await session.close()
    return None if creates_adapters(version) else version
