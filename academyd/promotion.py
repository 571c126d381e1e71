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
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from academyd import events
from academyd.files import atomic_write_json, atomic_write_text
from academyd.registry import MANIFEST_FILE, Registry, RegistryError, adapter_sha256, champion_version
from academyd.settings import Settings
from academyd.store import Store, iso

log = structlog.get_logger("academyd.promotion")

OLLAMA_PREFIX = "venom-adapter-"
METRIC_KEYS = ("heldout_loss", "heldout_perplexity", "exact_match", "chrf", "general_loss")

# (marker, stop, Ollama template (Go text/template)) for the chat-template families we can recognise in a tokenizer's
# Jinja template. Anything else gets no TEMPLATE line: Ollama then uses the base model's own template.
OLLAMA_TEMPLATES = {
    "chatml": (
        "<|im_start|>",
        "<|im_end|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|start_header_id|>",
        "<|eot_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "gemma": (
        "<start_of_turn>",
        "<end_of_turn>",
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ),
    "mistral": (
        "[INST]",
        "</s>",
        "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
        "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
    ),
}


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


class OllamaError(Exception):
    """Ollama's API failed; the message names the endpoint and what it answered."""


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


def ollama_template(chat_template: str | None) -> tuple[str | None, str | None, str | None]:
    """(family, Ollama TEMPLATE, end-of-turn stop) for a tokenizer's Jinja chat template; Nones when the
    family is not recognised."""
    if not chat_template:
        return None, None, None
    for family, (marker, stop, template) in OLLAMA_TEMPLATES.items():
        if marker in chat_template:
            return family, template, stop
    return None, None, None


def tokenizer_facts(adapter_dir: Path) -> dict[str, Any]:
    """The chat template and EOS token the adapter's saved tokenizer declares (plain JSON, no transformers)."""
    facts: dict[str, Any] = {"chat_template": None, "eos_token": None}
    cfg_path = adapter_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        facts["chat_template"] = cfg.get("chat_template")
        eos = cfg.get("eos_token")
        facts["eos_token"] = eos.get("content") if isinstance(eos, dict) else eos
    jinja = adapter_dir / "chat_template.jinja"
    if facts["chat_template"] is None and jinja.is_file():
        facts["chat_template"] = jinja.read_text()
    if isinstance(facts["chat_template"], list):  # several named templates: take "default"
        named = {t.get("name"): t.get("template") for t in facts["chat_template"] if isinstance(t, dict)}
        facts["chat_template"] = named.get("default") or next(iter(named.values()), None)
    return facts


def _param_lines(params: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
    return lines


def modelfile_text(*, from_: str, adapter: Path, template: str | None, parameters: dict[str, Any],
                   version: str, family: str | None, system: str | None = None) -> str:
    lines = [f"# venom-adapter-{version}, written by academyd", f"FROM {from_}", f"ADAPTER {adapter}"]
    if template is not None:
        lines.append(f"# TEMPLATE: the prompt form the adapter was trained with ({family})")
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: the tokenizer's chat template is not a known family; Ollama uses the base's")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += _param_lines(parameters)
    return "\n".join(lines) + "\n"


def model_parameters(settings: Settings, *stops: str | None) -> dict[str, Any]:
    """`arena.modelfile_parameters` with the given stop strings (end of turn, EOS) added to `stop`."""
    params = dict(settings.arena.modelfile_parameters)
    have = params.get("stop") or []
    have = list(have) if isinstance(have, list) else [have]
    for stop in stops:
        if stop and stop not in have:
            have.append(stop)
    if have:
        params["stop"] = have
    return params


# Venom's Alpaca prompt as an Ollama template (what an adapter trained with render = "plain" on Alpaca expects).
ALPACA_TEMPLATE = ("{{ if .System }}### Instruction:\n{{ .System }}\n\n### Input:\n{{ .Prompt }}{{ else }}"
                   "### Instruction:\n{{ .Prompt }}{{ end }}\n\n### Response:\n")


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
        # The very file the arena judged in llama.cpp (and whose sha256 its probes.json records).
        import shutil

        tmp = vdir / "adapter.gguf.tmp"
        shutil.copyfile(vdir / "arena" / "candidate.gguf", tmp)
        tmp.replace(vdir / "adapter.gguf")
        gguf_path = vdir / "adapter.gguf"
        notes.append("GGUF adapter: the one the arena measured in llama.cpp")
    else:
        tmp = vdir / f".adapter.gguf.tmp-{uuid.uuid4().hex[:8]}"  # two exports at once never share a file
        try:
            await run_trainer_module(settings, "academyd.arena.export_gguf",
                                     [str(adapter), str(tmp), "--base", row["base_model"]],
                                     time_limit_s=600, what="the GGUF export")
            await asyncio.to_thread(tmp.replace, vdir / "adapter.gguf")
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


def default_system(chat_template: str | None) -> str | None:
    """The system prompt a chat template adds when a conversation has none (SmolLM2's does): the Modelfile
    says it as SYSTEM, so Ollama's prompt is the one the adapter was trained on."""
    import re

    if not chat_template or "messages[0]['role'] != 'system'" not in chat_template:
        return None
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", chat_template, re.S)
    return m.group(1) if m else None


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


# ---------------------------------------------------------------- Ollama


async def _ollama_call(session: aiohttp.ClientSession, method: str, url: str, timeout_s: float,
                       **kw: Any) -> tuple[int, Any]:
    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kw) as resp:
            body = await resp.read()
            try:
                data = json.loads(body) if body else None
            except ValueError:
                data = body.decode(errors="replace")[:500]
            return resp.status, data
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OllamaError(f"Ollama at {url} unreachable: {type(exc).__name__}: {exc}") from None


async def ollama_create(
    settings: Settings, row: dict[str, Any], artifacts: dict[str, Any], *,
    http_session: aiohttp.ClientSession | None = None,
) -> dict[str, Any]:
    """Create `venom-adapter-<version>` in Ollama: upload the adapter blobs, then `POST /api/create`."""
    base = (settings.arena.ollama_url or "").rstrip("/")
    timeout = settings.arena.ollama_timeout_s
    name = OLLAMA_PREFIX + row["version"]
    if artifacts.get("gguf_path"):
        files = {"adapter.gguf": Path(artifacts["gguf_path"])}
    else:
        adapter = Path(row["adapter_path"])
        files = {n: adapter / n for n in ("adapter_model.safetensors", "adapter_config.json") if (adapter / n).is_file()}
    own = http_session is None
    session = http_session or aiohttp.ClientSession()
    try:
        adapters: dict[str, str] = {}
        for fname, path in files.items():
            digest = "sha256:" + await asyncio.to_thread(_sha256, path)
            status, _ = await _ollama_call(session, "HEAD", f"{base}/api/blobs/{digest}", timeout)
            if status == 404:
                data = await asyncio.to_thread(path.read_bytes)
                status, answer = await _ollama_call(session, "POST", f"{base}/api/blobs/{digest}", timeout, data=data)
                if status not in (200, 201):
                    raise OllamaError(f"Ollama refused the blob {fname} ({digest}): HTTP {status} {answer}")
            elif status != 200:
                raise OllamaError(f"Ollama {base}/api/blobs answered HTTP {status} for {fname}")
            adapters[fname] = digest
        body: dict[str, Any] = {"model": name, "from": artifacts["from"], "adapters": adapters,
                                "parameters": artifacts["parameters"], "stream": False}
        if artifacts.get("template"):
            body["template"] = artifacts["template"]
        status, answer = await _ollama_call(session, "POST", f"{base}/api/create", timeout, json=body)
        if status != 200 or (isinstance(answer, dict) and answer.get("error")):
            err = answer.get("error") if isinstance(answer, dict) else answer
            raise OllamaError(f"Ollama could not create {name} from {artifacts['from']}: HTTP {status}: {err}")
        return {"model": name, "adapters": adapters, "status": (answer or {}).get("status", "success")}
    finally:
        if own:
            await session.close()


def _sha256(path: Path) -> str:
    from academyd.registry import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------- payloads and active_adapter.json


def summary_metrics(row: dict[str, Any] | None, side: str = "candidate") -> dict[str, Any]:
    """The headline numbers of a version's own evaluation (its `candidate` side), flat."""
    if row is None:
        return {}
    m = row.get("metrics") or {}
    held, gen, forget = m.get("heldout") or {}, m.get("generation") or {}, m.get("forgetting") or {}
    out = {
        "heldout_loss": held.get(f"{side}_loss"),
        "heldout_perplexity": held.get(f"{side}_perplexity"),
        "exact_match": gen.get(f"{side}_exact_match"),
        "chrf": gen.get(f"{side}_chrf"),
        "general_loss": forget.get(f"{side}_loss"),
    }
    if side == "candidate" and held.get("improvement") is not None:
        out.update(improvement=held["improvement"], ci_low=held.get("ci_low"), ci_high=held.get("ci_high"),
                   compared_with=m.get("champion"))
    return {k: v for k, v in out.items() if v is not None}


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


def active_adapter_doc(row: dict[str, Any] | None, *, base_model: str, reason: str, now: datetime,
                       payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `active_adapter.json` says. `adapter_path: null` means: no adapter, run the base model."""
    if row is None:
        return {"adapter_id": None, "version": None, "adapter_path": None, "adapter_sha256": None,
                "gguf_path": None, "modelfile_path": None, "ollama_model": None, "base_model": base_model,
                "activated_at": iso(now), "reason": reason, "source": "academyd"}
    artifacts = row.get("artifacts") or {}
    return {"adapter_id": row["version"], "version": row["version"], "adapter_path": row["adapter_path"],
            "adapter_sha256": row["adapter_sha256"], "gguf_path": artifacts.get("gguf_path"),
            "modelfile_path": artifacts.get("modelfile_path"), "ollama_model": OLLAMA_PREFIX + row["version"],
            "base_model": row["base_model"], "parent_version": row.get("parent"), "activated_at": iso(now),
            "reason": reason, "source": "academyd",
            "metrics": (payload or {}).get("metrics") or summary_metrics(row)}


def write_active_adapter(settings: Settings, doc: dict[str, Any]) -> Path:
    path = settings.active_adapter_path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return path


_WRITE_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _write_lock() -> asyncio.Lock:
    return _WRITE_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


async def write_active_adapter_async(settings: Settings, doc: dict[str, Any]) -> Path:
    """`write_active_adapter` off the event loop (an fsync'd file and directory). Moves call it right after
    their commit without yielding first, and the lock is first-come first-served: the file is written in
    commit order, so it ends naming the last champion committed."""
    async with _write_lock():
        return await asyncio.to_thread(write_active_adapter, settings, doc)


async def sync_active_adapter_async(settings: Settings, now: datetime) -> bool:
    """`sync_active_adapter` off the event loop, on a connection of its own (the daemon's is the loop's)."""

    def work() -> bool:
        store = Store(settings.db_path)
        try:
            return sync_active_adapter(store, settings, now)
        finally:
            store.close()

    async with _write_lock():
        return await asyncio.to_thread(work)


def sync_active_adapter(store: Store, settings: Settings, now: datetime) -> bool:
    """Rewrite `active_adapter.json` when it does not name the registry's champion; True if rewritten.
    Only versions the registry knows are touched: with no champion and no file, nothing is written."""
    reg = Registry(store, settings)
    champ = reg.champion()
    path = settings.active_adapter_path
    current = None
    if path.is_file():
        try:
            current = json.loads(path.read_text()).get("version")
        except (ValueError, AttributeError):
            current = "?"
    want = champ["version"] if champ else None
    if current == want and (path.is_file() or champ is None):
        return False
    if champ is None and not path.is_file():
        return False
    base = champ["base_model"] if champ else (settings.training.base_model or "")
    write_active_adapter(settings, active_adapter_doc(champ, base_model=base, reason="resynchronised at start",
                                                      now=now))
    return True


# ---------------------------------------------------------------- promote / rollback


async def _prepare(settings: Settings, row: dict[str, Any], http_session: aiohttp.ClientSession | None,
                   store: Store | None = None) -> dict[str, Any]:
    await asyncio.to_thread(verify_files, row)  # hashes every adapter file: off the loop
    artifacts = reusable_artifacts(settings, row)
    if artifacts is None:
        artifacts = await build_artifacts(settings, row)
        if store is not None:  # built once per version: a later move of it reuses them
            with store.transaction() as conn:
                conn.execute("UPDATE models SET artifacts=? WHERE version=?",
                             (json.dumps(_artifacts_record(artifacts)), row["version"]))
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


def _compare_and_swap(conn: Any, expected: Any, *, action: str, to: str | None, basis: str | None, reason: str,
                      now: datetime) -> str | None:
    """Inside the move's transaction: refuse unless the champion is still `expected` (ANY: whatever it is),
    and record the move (`champion_moves`); a `basis` (the verdict or watch decision acted on) can be used
    once. Returns the champion the move starts from."""
    actual = champion_version(conn)
    if expected is not ANY and actual != expected:
        raise StaleChampion(
            f"{action} to {_base(to)} refused: it was decided against {_base(expected)}, but the champion is now "
            f"{_base(actual)} (another promotion or rollback came first); nothing changed", expected=expected,
            actual=actual)
    try:
        conn.execute("INSERT INTO champion_moves(action, from_version, to_version, basis, reason, at)"
                     " VALUES (?,?,?,?,?,?)", (action, actual, to, basis, reason, iso(now)))
    except sqlite3.IntegrityError:
        raise PromotionRefused(f"{action} refused: {basis} was already acted on; nothing changed") from None
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
    current = champion_version(store.conn)
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
    with store.transaction() as conn:
        _compare_and_swap(conn, expected_champion, action="promote", to=version, basis=basis, reason=reason,
                          now=now)
        if previous is not None:
            conn.execute("UPDATE models SET status='retired' WHERE version=?", (previous["version"],))
            reg._history(previous["version"], "retired", f"{version} promoted", now)
        conn.execute("UPDATE models SET status='champion', promoted_at=?, artifacts=? WHERE version=?",
                     (iso(now), json.dumps(_artifacts_record(artifacts)), version))
        _set_alias(conn, version, now)
        reg._history(version, "promoted", reason, now)
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
    with store.transaction() as conn:
        _compare_and_swap(conn, champ["version"], action="rollback", to=rolled["to_version"], basis=basis,
                          reason=reason, now=now)
        conn.execute("UPDATE models SET status='rejected' WHERE version=?", (champ["version"],))
        reg._history(champ["version"], "rolled_back", reason, now)
        events.enqueue(store, rolled_event, now)
        if target is not None and promoted_ev is not None and artifacts is not None:
            conn.execute("UPDATE models SET status='champion', promoted_at=?, artifacts=? WHERE version=?",
                         (iso(now), json.dumps(_artifacts_record(artifacts)), target["version"]))
            _set_alias(conn, target["version"], now)
            reg._history(target["version"], "promoted", f"rollback from {champ['version']}: {reason}", now)
            events.enqueue(store, promoted_ev, now)
        else:
            conn.execute("DELETE FROM model_aliases WHERE alias='champion'")
    restored = reg.get(target["version"]) if target else None
    await write_active_adapter_async(settings, active_adapter_doc(
        restored, base_model=champ["base_model"], reason=f"rollback from {champ['version']}: {reason}", now=now,
        payload=promoted))
    log.info("model.rolled_back", from_version=champ["version"], to_version=rolled["to_version"], reason=reason)
    return {**rolled, "rolled_back": rolled, "promoted": promoted}


def _set_alias(conn: Any, version: str, now: datetime) -> None:
    conn.execute(
        "INSERT INTO model_aliases(alias, version, updated_at) VALUES ('champion', ?, ?)"
        " ON CONFLICT(alias) DO UPDATE SET version=excluded.version, updated_at=excluded.updated_at",
        (version, iso(now)),
    )
