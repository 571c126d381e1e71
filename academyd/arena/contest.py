"""The arena's daemon side: run the measurement in the trainer's environment, ask the judge, apply the gate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from academyd.arena.gate import Verdict, decide
from academyd.arena.judge import JudgeError, judge
from academyd.childenv import child_env
from academyd.settings import Settings
from schemas.models import is_version

log = structlog.get_logger("academyd.arena")

GENERAL_SET = Path(__file__).parent / "data" / "general.jsonl"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ArenaError(Exception):
    """The measurement could not run or failed; the message says why and what to do."""


def trainer_python(settings: Settings) -> Path:
    from academyd.habitat.process import default_trainer_python

    return Path(settings.training.trainer_python or default_trainer_python())


async def run_trainer_module(
    settings: Settings, module: str, args: list[str], *, time_limit_s: float, what: str,
    python: Path | None = None, env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `<trainer-python> -m module args...` (its own process group), time-limited; return its JSON line.
    `python`: another trainer interpreter than the settings' (a worker's --trainer-python); `env`: variables
    passed to it beside the allowlisted environment.

    Raises ArenaError with the tool's own reason (bad input, a crash with the tail of stderr, a timeout).
    """
    py = python or trainer_python(settings)
    if not py.is_file():
        raise ArenaError(f"trainer environment not found: {py} does not exist; run `make trainer-env` "
                         "(or set training.trainer_python / ACADEMY_TRAINING__TRAINER_PYTHON)")
    proc = await asyncio.create_subprocess_exec(
        str(py), "-m", module, *args, env=child_env(env, pythonpath=str(REPO_ROOT)), start_new_session=True,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=time_limit_s)
    except asyncio.CancelledError:
        # The daemon is stopping: the measurement goes with it and is redone at the next start.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise ArenaError(f"{what} took longer than {time_limit_s:g} s and was stopped "
                         "(raise arena.eval_time_limit_s or lower arena.generation_sample)") from None
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if proc.returncode != 0 or "error" in result or not result:
        reason = result.get("reason") or stderr.decode(errors="replace").strip()[-2000:] or "no output"
        raise ArenaError(f"{what} failed (exit {proc.returncode}): {reason}")
    return result


def dataset_sidecars(heldout_path: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The checks file and the manifest the curator wrote beside a held-out set (`heldout_<tag>.jsonl`)."""
    name = heldout_path.name
    if not name.startswith("heldout_"):
        return None, None
    tag = name[len("heldout_"):-len(".jsonl")]
    checks = heldout_path.with_name(f"checks_{tag}.jsonl")
    manifest_path = heldout_path.with_name(f"dataset_{tag}.manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    return (checks if checks.is_file() else None), manifest


def training_summary(adapter: Path) -> dict[str, Any]:
    """What the gate reports from the candidate's training (the run's summary.json, which the registry keeps
    beside the adapter): its KL to the base on the general set, the budget, the step kept. {} when absent."""
    try:
        summary = json.loads((adapter.parent / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(summary, dict):
        return {}
    validation = summary.get("validation") if isinstance(summary.get("validation"), dict) else {}
    out = {"general_kl": summary.get("general_kl"), "kl_budget": summary.get("kl_budget"),
           "kl_stopped": summary.get("kl_stopped"),
           "validation": {k: validation.get(k) for k in ("questions", "kept_step", "right", "accuracy")}}
    return {k: v for k, v in out.items() if v is not None}


def read_checks(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def serve_args(settings: Settings) -> list[str]:
    """Where the follower serves merged models (the `ollama` target: Ollama from 0.34.1 on creates no adapter
    models), the arena measures the merged GGUF, the serving artifact, instead of base + adapter. With
    `ollama_serve = auto` the Ollama version is not known here: merged is measured (it serves from 0.34.1 on;
    on an older Ollama the adapter model answers within the agreement margin of it)."""
    follower = settings.follower
    return ["--serve", "merged"] if follower.target == "ollama" and follower.ollama_serve != "adapter" else []


def measure_options(settings: Settings, format: str) -> dict[str, Any]:
    """What the measurement is asked, apart from its files: the same wherever it runs (here or on a
    worker, which receives these in the job: academyd.worker.protocol.ArenaOptions)."""
    arena = settings.arena
    return {"format": format, "render": settings.training.render, "runtime": arena.runtime,
            "serve": "merged" if serve_args(settings) else "adapter", "generation_sample": arena.generation_sample,
            "general_sample": arena.general_sample, "answer_sample": arena.answer_sample,
            "max_new_tokens": arena.max_new_tokens, "max_length": settings.training.max_seq_length or None,
            "seed": arena.seed, "cpu_threads": arena.cpu_threads or None,
            "time_limit_s": arena.eval_time_limit_s}


def measure_args(options: dict[str, Any], *, base: str, candidate: Path, champion: Path | None, heldout: Path,
                 general: Path, checks: Path | None, out_dir: Path) -> list[str]:
    """The command line of `academyd.arena.measure` for `options` (measure_options) and these files."""
    o = options
    args = ["--base", base, "--candidate", str(candidate), "--heldout", str(heldout),
            "--general", str(general), "--format", o["format"], "--generation-sample", str(o["generation_sample"]),
            "--max-new-tokens", str(o["max_new_tokens"]), "--seed", str(o["seed"]),
            "--render", o["render"], "--runtime", o["runtime"], "--out-dir", str(out_dir),
            "--general-sample", str(o["general_sample"])]
    if o.get("max_length"):
        args += ["--max-length", str(o["max_length"])]
    if checks is not None:
        args += ["--checks", str(checks), "--answer-sample", str(o["answer_sample"])]
    if champion is not None:
        args += ["--champion", str(champion)]
    if o.get("cpu_threads"):
        args += ["--cpu-threads", str(o["cpu_threads"])]
    if o.get("serve") == "merged":
        args += ["--serve", "merged"]
    return args


async def evaluate(
    settings: Settings,
    *,
    candidate_adapter: Path,
    champion_adapter: Path | None,
    base_model: str,
    heldout_path: Path,
    format: str,
    out_dir: Path,
    champion: str | None = None,
    http_session: aiohttp.ClientSession | None = None,
    nc: Any = None,
    run_id: str | None = None,
) -> Verdict:
    """Candidate against champion (the base model when `champion_adapter` is None).

    Runs `academyd.arena.measure` in the trainer's environment (held-out loss per example, the general set,
    generation on a sample), asks the judge when `arena.judge_url` and `arena.judge_model` are set, and
    applies the gate (`academyd.arena.gate.decide`). Writes `measure.json` and `verdict.json` into
    `out_dir`. `champion` is the champion's version name, for the reasons and the event (default: the
    `vN` of a registry path `models/<vN>/adapter`, else the path). Raises ArenaError when the
    measurement cannot be made (the verdict is then unknown, not a rejection).

    With `arena.where = worker` the measurement is a job for an `academyd worker` (academyd.arena.remote,
    over `nc`; the job is named after `run_id` and what is measured) and comes back through its lease
    and the object store; everything after it (judge, checks, the gate) is the same as for a local one.
    """
    arena = settings.arena
    if champion is None and champion_adapter is not None:
        # The registry keeps adapters at models/<vN>/adapter: name the champion by its version.
        name = champion_adapter.parent.name
        champion = name if is_version(name) else str(champion_adapter)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks_path, manifest = dataset_sidecars(heldout_path)
    options = measure_options(settings, format)
    if arena.where == "worker":
        # The measurement (and the GGUF export it makes) runs as a job for a worker; the gate below stays
        # here: the daemon trusts a worker's numbers no more than a local subprocess's, it decides on them.
        from academyd.arena.remote import measure_on_worker

        if nc is None:
            raise ArenaError("arena.where = worker needs the daemon's NATS connection (nats.url)")
        log.info("arena.measure", candidate=str(candidate_adapter), champion=champion or "base", where="worker")
        measurement = await measure_on_worker(
            settings, nc, run_id=run_id, base_model=base_model, candidate=candidate_adapter,
            champion=champion_adapter, heldout=heldout_path, general=GENERAL_SET, checks=checks_path,
            options=options, out_dir=out_dir)
    else:
        args = measure_args(options, base=base_model, candidate=candidate_adapter, champion=champion_adapter,
                            heldout=heldout_path, general=GENERAL_SET, checks=checks_path, out_dir=out_dir)
        log.info("arena.measure", candidate=str(candidate_adapter), champion=champion or "base")
        measurement = await run_trainer_module(settings, "academyd.arena.measure", args,
                                               time_limit_s=arena.eval_time_limit_s,
                                               what="the arena's measurement")
    if arena.judge_url and arena.judge_model and measurement.get("generation", {}).get("examples"):
        try:
            measurement["judge"] = await judge(measurement["generation"]["examples"], url=arena.judge_url,
                                               model=arena.judge_model, timeout_s=arena.judge_timeout_s,
                                               session=http_session)
        except JudgeError as exc:
            # The judge is optional evidence: its failure is recorded, not fatal.
            log.warning("arena.judge_failed", error=str(exc))
            measurement["judge"] = {"error": str(exc)}
    training = training_summary(candidate_adapter)
    if training:
        measurement["training"] = training
    if checks_path is not None:
        measurement["checks"] = read_checks(checks_path)
    if manifest is not None and isinstance(manifest.get("families"), dict):
        measurement["families"] = {**{k: v for k, v in manifest["families"].items() if k != "moves"},
                                   "heldout_fraction": (manifest.get("split") or {}).get("heldout_fraction")}
    (out_dir / "measure.json").write_text(json.dumps(measurement, indent=1))
    verdict = await asyncio.to_thread(decide, measurement, arena, champion=champion)
    (out_dir / "verdict.json").write_text(json.dumps(verdict.to_event(), indent=2, default=str))
    log.info("arena.verdict", promote=verdict.promote, reasons=verdict.reasons)
    return verdict
