"""The training pipeline: a requested run becomes dataset -> training -> evaluation -> promotion.

Every step's state lives in the `runs` table, and every event goes out through the outbox, so a daemon
that restarts picks the active run up where it was: curation is redone (it is deterministic), a training
job is re-attached through its habitat ref (or started again with the same spec, which resumes from the
trainer's last checkpoint), an evaluation is redone. A failed run frees the slot and the policy retries
with backoff.

The pipeline never imports torch: the trainer and the arena's measurements run in the trainer's
environment (a process or a container).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from academyd import events
from academyd.active_adapter import sync_active_adapter_async
from academyd.champion.moves import ANY
from academyd.clock import Clock
from academyd.events import EventSink
from academyd.habitat import HabitatError, JobHandle, JobStatus, TrainingJob, habitat_for
from academyd.health import Health
from academyd.policy import failure_backoff
from academyd.runs import IllegalTransition
from academyd.seams import ChampionMoves, RunRequests
from academyd.settings import Settings
from academyd.store import Store, iso
from academyd.supervise import HealthReport, supervise
from academyd.trainer.spec import SpecError, TrainSpec, spec_hash

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from academyd.basemodel import BaseModel

log = structlog.get_logger("academyd.pipeline")

MAX_REMEASURE = 2

PROGRESS_FIELDS = ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss")


class RunFailed(Exception):
    """A step failed for a reason the run records (and the policy backs off from)."""

    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


class Pipeline:
    """Depends on its seams (academyd.seams), not on the daemon: the store it moves runs in, the clock,
    the event sink, the trigger it asks for the next run, the champion it promotes through, the NATS
    connection (remote workers) and the resolved base model."""

    def __init__(self, settings: Settings, store: Store, clock: Clock, sink: EventSink, runs: RunRequests,
                 champion: ChampionMoves, *, nc: NATS | None = None, base: BaseModel | None = None,
                 health: HealthReport | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.sink = sink
        self.runs = runs
        self.champion = champion
        self.nc = nc
        self.base = base
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._live: dict[str, Any] = {}
        self._habitat: Any = None
        self.health = health or Health()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # active_adapter.json is written after the promotion commits: repair a crash in between (off the loop).
        if await sync_active_adapter_async(self.settings, self.clock()):
            log.warning("active_adapter_resynchronised")
        if self.settings.training.autorun:
            self._task = asyncio.create_task(self._supervised(self._loop), name="pipeline")
        elif self.nc is not None:
            # autorun=false: this daemon never trains on its own host. A run waits, recorded, until an
            # `academyd worker` is connected, then goes to the workers (the nats habitat) like any other.
            from academyd.habitat.nats import NatsHabitat

            self._habitat = NatsHabitat(self.settings, self.nc)
            gate = self._habitat.any_worker
            self._task = asyncio.create_task(self._supervised(lambda: self._loop(gate=gate)), name="pipeline")

    async def _supervised(self, loop: Callable[[], Awaitable[None]]) -> None:
        """The loop, restarted with backoff when it dies (a store error in `_fail`): academyd.supervise."""
        sv = self.settings.supervision
        await supervise("pipeline", loop, stop=self._stopping, health=self.health, clock=self.clock,
                        first_s=sv.restart_backoff_s, max_s=sv.restart_backoff_max_s,
                        healthy_after_s=sv.healthy_after_s)

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        # The training job itself is left running (its habitat keeps it); the next start re-attaches.
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self, gate: Any = None) -> None:
        while True:
            run = self.store.active_run()
            if run is not None and (gate is None or await gate()):
                try:
                    await self.execute(run["run_id"])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must not wedge the slot: end its job, fail the run, say why
                    log.exception("pipeline_crashed", run_id=run["run_id"])
                    await self._cancel_job(run["run_id"])
                    self._fail(run["run_id"], f"internal error: {type(exc).__name__}: {exc}")
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)
            except TimeoutError:
                pass

    async def _cancel_job(self, run_id: str) -> None:
        """Cancel the run's training job, if it has one, before the run is failed: the next run must not
        start while this one's trainer still holds the slot."""
        run = self.store.get_run(run_id)
        if not run or not run.get("job_ref"):
            return
        try:
            habitat = self.habitat()
            handle = await habitat.reattach(run["job_ref"])
            if handle is not None:
                await habitat.cancel(handle)
                log.warning("job_cancelled_after_internal_error", run_id=run_id, ref=run["job_ref"])
        except Exception:
            log.exception("job_cancel_failed", run_id=run_id, ref=run["job_ref"])

    def habitat(self) -> Any:
        if self._habitat is None:
            self._habitat = habitat_for(self.settings, nc=self.nc)
        return self._habitat

    # ------------------------------------------------------------ one run

    async def execute(self, run_id: str) -> None:
        run = self.store.get_run(run_id)
        assert run is not None
        log.info("run_started", run_id=run_id, state=run["state"])
        try:
            if run["state"] in ("requested", "curating"):
                # Lessons up to here are in the dataset about to be read: they stop counting as new.
                self._set(run_id, "curating", lesson_watermark=self.store.max_lesson_seq())
                dataset = await self._curate(run_id)
                self._set(run_id, "training", dataset_id=dataset["dataset_id"])
            run = self.store.get_run(run_id) or run
            if run["state"] == "training":
                version = await self._train(run)
                self._set(run_id, "evaluating", version=version)
            run = self.store.get_run(run_id) or run
            if run["state"] == "evaluating":
                await self._evaluate(run)
                self._finish(run_id)
        except RunFailed as exc:
            self._fail(run_id, str(exc), refused=exc.refused)
        finally:
            self._live.pop(run_id, None)

    def _set(self, run_id: str, state: str, **fields: Any) -> None:
        with self.store.transaction():
            self.store.move_run(run_id, state, self.clock(), **fields)

    def _finish(self, run_id: str) -> None:
        self._set(run_id, "succeeded")
        log.info("run_succeeded", run_id=run_id)
        self.runs.evaluate("run-finished")

    def _fail(self, run_id: str, reason: str, refused: bool = False) -> None:
        now = self.clock()
        snap = self.store.snapshot()
        retry_at = now + failure_backoff(self.settings.policy, snap.consecutive_failures + 1)
        try:
            with self.store.transaction():
                self.store.move_run(run_id, "refused" if refused else "failed", now, error=reason)
                self.sink.emit("academy.training.failed", f"{run_id}-failed", now,
                               {"run_id": run_id, "reason": reason, "retry_at": iso(retry_at)})
        except IllegalTransition as exc:  # it ended meanwhile (cancelled, finished): nothing to fail
            log.warning("run_already_ended", run_id=run_id, reason=reason, why=str(exc))
            return
        log.warning("run_failed", run_id=run_id, reason=reason, refused=refused, retry_at=iso(retry_at))
        self.sink.kick()

    def _publish(self, subject: str, event_id: str, body: dict[str, Any]) -> None:
        now = self.clock()
        with self.store.transaction():
            self.sink.emit(subject, event_id, now, body)
        self.sink.kick()

    # ------------------------------------------------------------ curation

    async def _curate(self, run_id: str) -> dict[str, Any]:
        result = await self._build(run_id)
        if result.refused:
            raise RunFailed(f"dataset refused: {result.refused}", refused=True)
        return {"dataset_id": result.dataset_id}

    async def _build(self, run_id: str | None) -> Any:
        from academyd.curator import build_dataset

        settings, now = self.settings, self.clock()

        def work() -> Any:
            # Curation is CPU-bound: a worker thread with its own connection keeps the loop responsive.
            # `announce` queues academy.dataset.built in the transaction that records the dataset.
            store = Store(settings.db_path)
            try:
                return build_dataset(settings, store, now=now, run_id=run_id, announce=True)
            finally:
                store.close()

        result = await asyncio.to_thread(work)
        self.sink.kick()
        log.info("dataset_built", run_id=run_id, dataset_id=result.dataset_id, examples=result.examples,
                 refused=result.refused)
        return result

    async def build_dataset(self, reason: str = "manual") -> dict[str, Any]:
        """`academy.cmd.dataset`: build a dataset now, outside any run."""
        result = await self._build(None)
        if result.refused:
            return {"ok": False, "reason": reason, "dataset_id": result.dataset_id, "refused": result.refused,
                    "error": f"dataset refused: {result.refused}", "dropped": result.dropped}
        return {"ok": True, "reason": reason, **result.event_payload()}

    # ------------------------------------------------------------ training

    def _spec(self, run: dict[str, Any]) -> TrainSpec:
        t = self.settings.training
        ds = self.store.get_dataset(run["dataset_id"])
        if ds is None:
            raise RunFailed(f"dataset {run['dataset_id']} is not in the store")
        base = self.base.path if self.base is not None else t.base_model
        if not base:
            raise RunFailed("no base model configured: set training.base_model (ACADEMY_TRAINING__BASE_MODEL)")
        # The recipe's settings, then the hyperparameters entries (which win).
        recipe = {"replay_general": t.replay_general, "epochs": t.epochs, "learning_rate": t.learning_rate}
        hp: dict[str, Any] = {**{k: v for k, v in recipe.items() if v is not None}, **t.hyperparameters}
        if t.max_seq_length is not None:
            hp["max_length"] = t.max_seq_length
        self._check_servable(hp)
        raw = {
            "base_model": base,
            "dataset_path": ds["path"],
            "heldout_path": ds["heldout_path"],
            "format": ds["format"],
            "render": t.render,
            "output_dir": str((self.settings.runs_dir / run["run_id"]).resolve()),
            "hyperparameters": hp,
            "seed": t.seed,
            "backend": t.backend,
            "max_steps": t.max_steps,
            "run_id": run["run_id"],
            "cpu_threads": t.cpu_threads,
        }
        # The curator's validation families (curator.validation_families): the trainer keeps its best step on them.
        from academyd.curator.validation import read_validation

        validation = read_validation(ds["heldout_path"])
        if validation:
            raw["validation"] = validation
        try:
            return TrainSpec.from_dict(raw)
        except SpecError as exc:
            raise RunFailed(f"training settings rejected: {exc}") from None

    async def _check_inputs(self, run: dict[str, Any], spec: TrainSpec) -> None:
        """The trainer reads only what the scanner passes: a dataset written before the scanner was
        race-free (or by hand) may hold a secret, and a model must not learn one."""
        from academyd.secrets import scanner

        for path in (spec.dataset_path, spec.heldout_path):
            if path:
                found = await asyncio.to_thread(scanner().scan_file, path)
                if found:
                    raise RunFailed(f"dataset {run['dataset_id']} holds secrets ({', '.join(sorted(found))}) in "
                                    f"{path}; it is not trained on. Build a new dataset (academyd dataset) and "
                                    "delete this one")

    def _check_servable(self, hp: dict[str, Any]) -> None:
        """Refuse, before training, a LoRA the configured runtimes cannot load (academyd.arena.limits)."""
        from academyd.arena.limits import serving_problems, serving_runtimes

        hidden = self.base.hidden_size if self.base is not None else None
        problems = serving_problems(hp, serving_runtimes(self.settings.arena), hidden_size=hidden)
        if problems:
            raise RunFailed("not servable: " + "; ".join(problems), refused=True)

    async def _train(self, run: dict[str, Any]) -> str:
        run_id = run["run_id"]
        spec = self._spec(run)
        habitat = self.habitat()
        handle: JobHandle | None = None
        if run.get("job_ref"):
            handle = await habitat.reattach(run["job_ref"])
            if handle is not None:
                log.info("training_reattached", run_id=run_id, ref=handle.ref)
        if handle is None or (await habitat.status(handle)) is JobStatus.LOST:
            await self._check_inputs(run, spec)
            t = self.settings.training
            job = TrainingJob(spec=spec, run_id=run_id, time_limit_s=t.time_limit_s,
                              memory_limit_mb=t.memory_limit_mb or None)
            try:
                handle = await habitat.start(job)
            except HabitatError as exc:
                raise RunFailed(f"habitat {habitat.name}: {exc}") from None
            with self.store.transaction():
                self.store.move_run(run_id, "training", self.clock(), job_ref=handle.ref, habitat=habitat.name)
                attempt = hashlib.sha256(handle.ref.encode()).hexdigest()[:12]
                self.sink.emit("academy.training.started", f"{run_id}-started-{attempt}", self.clock(),
                               {"run_id": run_id, "habitat": habitat.name, "dataset_id": run["dataset_id"],
                                "spec_hash": spec_hash(spec)})
            self.sink.kick()
            log.info("training_started", run_id=run_id, habitat=habitat.name, ref=handle.ref)
        await self._forward_progress(run_id, habitat, handle)
        result = await habitat.result(handle)
        if result.status is not JobStatus.SUCCEEDED or not result.adapter_path:
            raise RunFailed(f"training {result.status.value}: {result.reason or 'no reason given'}"
                            + (f" (exit {result.exit_code})" if result.exit_code is not None else ""))
        return await self._register(run, spec, result)

    async def _forward_progress(self, run_id: str, habitat: Any, handle: JobHandle) -> None:
        """Trainer events -> `academy.training.progress`, at most `progress_per_s` a second."""
        min_gap = 1.0 / self.settings.training.progress_per_s
        last_sent, pending = 0.0, None
        started = time.monotonic()
        async for ev in habitat.progress(handle):
            if ev.get("type") != "progress":
                continue
            body = {k: ev[k] for k in PROGRESS_FIELDS if ev.get(k) is not None}
            step, total = body.get("step"), body.get("total_steps")
            if step and total:
                body["eta_s"] = round((time.monotonic() - started) / step * (total - step), 1)
            body["run_id"] = run_id
            self._live[run_id] = body
            pending = body
            if time.monotonic() - last_sent >= min_gap:
                self._send_progress(body)
                last_sent, pending = time.monotonic(), None
        if pending is not None:
            self._send_progress(pending)

    def _send_progress(self, body: dict[str, Any]) -> None:
        try:
            self._publish("academy.training.progress", f"{body['run_id']}-progress-{body.get('step', 0)}", body)
        except events.EventRefused as exc:  # a trainer event off the contract costs a progress line, not the run
            log.warning("progress_refused", run_id=body["run_id"], error=str(exc))

    async def _register(self, run: dict[str, Any], spec: TrainSpec, result: Any) -> str:
        from academyd.registry import Registry

        summary = dict(result.summary or {})
        summary.setdefault("spec_hash", spec_hash(spec))
        summary.setdefault("spec", spec.to_dict())
        settings, now = self.settings, self.clock()

        def work() -> dict[str, Any]:
            # Copying and hashing the adapter (megabytes, for a large base gigabytes) runs on a worker
            # thread with a connection of its own, like curation: the loop keeps acking.
            store = Store(settings.db_path)
            try:
                return Registry(store, settings).add_candidate(
                    run_id=run["run_id"], adapter_src=Path(result.adapter_path), run_summary=summary,
                    dataset=store.get_dataset(run["dataset_id"]), base_model=spec.base_model, now=now,
                )
            finally:
                store.close()

        model = await asyncio.to_thread(work)
        version = model["version"]
        self._publish("academy.training.finished", f"{run['run_id']}-finished", {
            "run_id": run["run_id"], "version": version, "adapter_path": model.get("adapter_path"),
            "backend": summary.get("backend"), "final_loss": summary.get("final_loss"),
            "duration_s": summary.get("duration_s"),
        })
        log.info("training_finished", run_id=run["run_id"], version=version, backend=summary.get("backend"))
        return version

    # ------------------------------------------------------------ evaluation and promotion

    async def _evaluate(self, run: dict[str, Any]) -> None:
        from academyd.arena import evaluate
        from academyd.registry import Registry

        registry = Registry(self.store, self.settings)
        version = run["version"]
        model = registry.get(version)
        if model is None:
            raise RunFailed(f"version {version} is missing from the registry")
        if model.get("promoted_at"):
            # A daemon that died between this run's promotion and its end: the promotion stands. Measuring
            # again would judge the champion against itself and overwrite the verdict it was promoted on.
            log.info("evaluation_already_promoted", run_id=run["run_id"], version=version,
                     promoted_at=model["promoted_at"])
            return
        ds = self.store.get_dataset(run["dataset_id"])
        if ds is None:
            raise RunFailed(f"dataset {run['dataset_id']} is not in the store")
        # The verdict is measured against one champion and promotion is a compare-and-swap on it: if the
        # champion moves during the measurement (up to an hour), the candidate is measured again against
        # the new one, at most MAX_REMEASURE times, then the run is refused with the reason.
        stale = ""
        for _attempt in range(1 + MAX_REMEASURE):
            champion = registry.champion()
            measured_against = champion["version"] if champion else None
            try:
                verdict = await evaluate(
                    self.settings,
                    candidate_adapter=Path(model["adapter_path"]),
                    champion_adapter=Path(champion["adapter_path"]) if champion else None,
                    base_model=model["base_model"],
                    heldout_path=Path(ds["heldout_path"]),
                    format=ds["format"],
                    out_dir=self.settings.models_dir / version / "arena",
                    champion=measured_against,
                    nc=self.nc, run_id=run["run_id"],  # arena.where = worker: a job for a worker
                )
            except Exception as exc:
                raise RunFailed(f"evaluation failed: {exc}") from None
            with self.store.transaction():
                event = registry.record_verdict(version, verdict, self.clock(), run_id=run["run_id"])
            self.sink.kick()
            await asyncio.to_thread(registry.write_metrics, version, verdict)
            log.info("evaluation_finished", run_id=run["run_id"], version=version, promote=verdict.promote,
                     reasons=verdict.reasons, champion=measured_against)
            if not (verdict.promote and self.settings.arena.auto_promote):
                return
            result = await self.promote(version, reason="; ".join(verdict.reasons) or "better on held-out data",
                                        expected=measured_against, basis=event["event_id"])
            if result.get("ok"):
                return
            if not result.get("stale"):
                raise RunFailed(f"promotion of {version} refused: {result.get('error')}")
            stale = str(result.get("error"))
            log.warning("verdict_stale", run_id=run["run_id"], version=version, reason=stale)
        raise RunFailed(f"promotion of {version} refused: the champion kept moving while it was measured ({stale})",
                        refused=True)

    async def promote(self, version: str, *, reason: str = "manual", expected: Any = ANY,
                      basis: str | None = None) -> dict[str, Any]:
        """Through the champion service (compare-and-swap; see academyd.champion)."""
        return await self.champion.promote(version, reason=reason, expected=expected, basis=basis)

    async def rollback(self, *, reason: str = "manual") -> dict[str, Any]:
        return await self.champion.rollback(reason=reason)

    # ------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        from academyd.registry import Registry

        champ = Registry(self.store, self.settings).champion()
        out: dict[str, Any] = {"training": None, "champion": champ["version"] if champ else None,
                               "champion_generation": self.store.champion_generation(),  # the follower's desired state
                               "last_dataset": self.store.latest_dataset(),
                               "base_model": self.base.to_dict() if self.base is not None else None}
        run = self.store.active_run()
        if run is not None and run["run_id"] in self._live:
            out["training"] = self._live[run["run_id"]]
        note = getattr(self._habitat, "status_note", None)
        if run is not None and note is not None and note():
            out["waiting"] = note()  # e.g. no connected worker has the GPU the job needs
        return out

