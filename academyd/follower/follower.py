"""The follower: Venom's side of the hot swap. It converges; it does not replay.

The desired state is the champion with its `generation` (the id of the champion move that made it; every
promote and rollback increases it), carried by `model.promoted` / `model.rolled_back` and by the daemon's
`academy.status` (`champion`, `champion_generation`). The follower keeps the desired state, the version it
serves and the generation that reached, in its record (a JSON file replaced atomically), and:

- on every event (a durable JetStream consumer on the two subjects, one event at a time): validate it,
  record what it makes desired, ack, and wake the converger. The ack path does no runtime work. An event
  of an older generation than the desired or served one changes nothing (a `model.promoted` delivered
  after the rollback that superseded it); an event id already handled publishes its recorded outcome
  again (same `Nats-Msg-Id`). An event whose handling raises is retried `follower.max_tries` times, then
  dead-lettered (terminated on the server, recorded) and never blocks the next;
- on a timer (APScheduler, `follower.reconcile_interval_s`): ask the daemon for the desired state and
  converge; the timer is also the backstop for a runtime that changed behind the follower's back;
- converging: when the runtime does not serve the desired version, deploy it (below). A runtime that does
  not answer is retried with backoff (`retry_initial_s`, doubling, at most the timer period) for as long
  as it takes, the status saying "diverged since T: why"; the first failure of a generation is reported
  once (`model.deploy_failed`, `target_failed`). A refusal (files, base, probe, the runtime's own
  reason_code) is reported once per generation and not retried until a newer generation (or a restart);
  an unexpected error is retried `max_tries` times, then the generation is dead-lettered. One
  `model.deployed` per generation reached, with the generation.

A deploy:
1. verify: the adapter's files hash to `adapter_sha256` (and the GGUF to `gguf_sha256` when announced),
   and the GGUF adapter's base identity (`general.base_model.*`) is the base the runtime serves;
2. stage the version beside the one serving, ask it the frozen probe prompts (chat messages, greedy), and
   compare with the answers the arena's runtime gave; below `follower.min_agreement` it is not switched
   to and is freed again, and the old version keeps serving (a runtime that can only be asked after the
   switch, Venom, is switched back);
3. switch, free the old one, record the outcome, publish `model.deployed` or `model.deploy_failed`.

Probe prompts come, in this order, from the event's `probe` list, from the arena's frozen probes (the
event's `probes_path`, else `models/<version>/arena/probes.json`: each probe's `runtime` answer is the
expected one, and its `adapter_gguf_sha256` is checked like an announced `gguf_sha256`), from
`models/<version>/probe.json`, from `follower.probe_file`, or three general questions without expected
answers (then the probe checks that the version answers at all). A probe item: `{"messages": [{"role",
"content"}...], "expected": str | null, "base_expected": str | null, "max_tokens": int?}`.

Embed it: `Follower(settings).run(stop)` (an asyncio.Event), or `academyd follow`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from academyd import events
from academyd.files import atomic_write_json
from academyd.follower.targets import Target, TargetError, make_target
from academyd.follower.verify import Refused, check_base, check_files, gguf_keys
from academyd.ingest import Inbound
from academyd.settings import Settings
from handlers import Ack, Outcome, Reject, Retry
from schemas.models import ModelPromoted, ModelRolledBack

log = structlog.get_logger("academyd.follower")

SUBJECTS = ["model.promoted", "model.rolled_back"]
DEFAULT_PROBE = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Name three primary colours."}]},
    {"messages": [{"role": "user", "content": "Write one sentence about the sea."}]},
]
KEEP_DONE = 1000
PROMPT_CHARS = 200
STOP_GRACE_S = 5.0


def _outcome_id(prefix: str, event: dict[str, Any]) -> str:
    return f"{prefix}-{event['event_id']}"[:200]


class State:
    """The follower's record (a JSON file, replaced atomically).

    `desired` ({version, generation, event_id, subject, at, from_version}), `serving` and
    `served_generation`, `known` promotions by version, `done` outcomes by event id, `settled` desired
    states (by key) reported as refused or dead-lettered, `tries` of unexpected failures by key,
    `dead` dead-lettered events, `diverged` ({since, why}) while the runtime is not on the desired state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data: dict[str, Any] = {}
        if path.is_file():
            data = json.loads(path.read_text())
        self.done: dict[str, dict[str, Any]] = data.get("done", {})
        self.known: dict[str, dict[str, Any]] = data.get("known", {})
        self.serving: str | None = data.get("serving")
        self.served_generation: int | None = data.get("served_generation")
        self.desired: dict[str, Any] | None = data.get("desired")
        self.reported: str | None = data.get("reported")
        self.settled: dict[str, str] = data.get("settled", {})
        self.tries: dict[str, int] = data.get("tries", {})
        self.dead: dict[str, str] = data.get("dead", {})
        self.diverged: dict[str, Any] | None = data.get("diverged")
        self.failure_reported: list[str] = data.get("failure_reported", [])

    def save(self) -> None:
        while len(self.done) > KEEP_DONE:
            self.done.pop(next(iter(self.done)))
        while len(self.dead) > KEEP_DONE:
            self.dead.pop(next(iter(self.dead)))
        self.failure_reported = self.failure_reported[-KEEP_DONE:]
        atomic_write_json(self.path, {
            "serving": self.serving, "served_generation": self.served_generation, "desired": self.desired,
            "reported": self.reported, "settled": self.settled, "tries": self.tries, "dead": self.dead,
            "diverged": self.diverged, "failure_reported": self.failure_reported, "done": self.done,
            "known": self.known}, indent=None)


def desired_key(desired: dict[str, Any]) -> str:
    """One desired state: its generation, or (an older daemon's event, no generation) its event id."""
    gen = desired.get("generation")
    return f"g{gen}" if gen is not None else f"e{desired['event_id']}"


def _arena_probes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The arena's frozen probes file (`models/<vN>/arena/probes.json`: {"max_tokens", "probes": [{"messages",
    "runtime", "trainer", ...}]}) as probe items: the runtime's greedy answer is the expected one."""
    tokens = doc.get("max_tokens")
    return [{"messages": p["messages"], "expected": p.get("runtime"), "base_expected": p.get("base_runtime"),
             **({"max_tokens": tokens} if tokens else {})} for p in doc["probes"] if p.get("messages")]


def load_probe(event: dict[str, Any], settings: Settings) -> tuple[list[dict[str, Any]], str]:
    """The probe prompts for a version, and where they came from."""
    if isinstance(event.get("probe"), list) and event["probe"]:
        return event["probe"], "event"
    candidates: list[Path] = []
    if event.get("probes_path"):
        candidates.append(Path(event["probes_path"]))
    if event.get("adapter_path"):
        vdir = Path(event["adapter_path"]).parent
        candidates += [vdir / "arena" / "probes.json", vdir / "probe.json"]
    if settings.follower.probe_file:
        candidates.append(settings.follower.probe_file)
    for path in candidates:
        if path.is_file():
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("probes"), list):
                items = _arena_probes(data)
            else:
                items = data.get("prompts") if isinstance(data, dict) else data
            if isinstance(items, list) and items:
                return items, str(path)
    return DEFAULT_PROBE, "default"


def announced_gguf_sha256(event: dict[str, Any]) -> str | None:
    """The GGUF adapter's sha256 as the Academy recorded it: in the event, or in the arena's probes file."""
    if event.get("gguf_sha256"):
        return str(event["gguf_sha256"])
    path = Path(event["probes_path"]) if event.get("probes_path") else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text()).get("adapter_gguf_sha256")
        except (ValueError, AttributeError):
            return None
    return None


def _matches(answer: str, expected: str) -> bool:
    a, e = answer.strip(), expected.strip()
    if not a or not e:
        return a == e
    # The arena and the probe may stop at different token limits: agreeing as far as both go counts.
    return a.startswith(e) or e.startswith(a)


def follower_nats(settings: Settings) -> Any:
    """How the follower authenticates: as configured, or on the embedded server of the same data directory as
    its own least-privilege identity (`follower`: its consumer, model.deployed / model.deploy_failed,
    academy.status); the daemon's identity only in a data directory made before the follower had one."""
    from academyd.bus import BusError
    from academyd.nats_auth import DAEMON, FOLLOWER, as_identity, password_file, read_password

    cfg = settings.nats
    if cfg.url or cfg.user or cfg.token or cfg.creds_file:
        return cfg
    for name in (FOLLOWER, DAEMON):
        password = read_password(settings.nats_dir, name)
        if password is not None:
            return as_identity(cfg, name, password)
    raise BusError(f"no credentials for the embedded NATS server ({password_file(settings.nats_dir, FOLLOWER)} is "
                   "missing): start the daemon in this data directory first, pass its --data-dir, or "
                   "--nats-url / ACADEMY_NATS__URL with nats.user/password or creds_file")


class Follower:
    """Converges a runtime on the Academy's champion (see the module's docstring)."""

    def __init__(self, settings: Settings, *, target: Target | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.cfg = settings.follower
        self.target = target or make_target(settings)
        self.clock = clock
        self.state = State(settings.follower_dir / f"state-{self.target.name}.json")
        self.bus: Any = None
        self.feed: Any = None
        self.ready = asyncio.Event()
        self.handled: list[tuple[str, dict[str, Any]]] = []  # (subject, payload) published, for embedders
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._lock = asyncio.Lock()
        self._scheduler: Any = None
        self.converged = asyncio.Event()  # set while the runtime serves the desired state (tests, embedders)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        from academyd.bus import Bus, Feed
        from academyd.commands.common import daemon_url

        await self.target.start()
        self.target.assume(self.state.serving)
        # A refusal is retried once per start (the operator may have fixed what was refused); a
        # dead-lettered generation is not.
        self.state.settled = {k: v for k, v in self.state.settled.items() if v == "dead_lettered"}
        self.bus = Bus(follower_nats(self.settings))
        await self.bus.connect(daemon_url(self.settings))
        if self.bus.cfg.user in (None, "academyd"):
            # Only the daemon (or a server without users) may create the streams; the follower's own identity
            # has no stream admin and binds to the stream the daemon made.
            await self.bus.ensure_streams()
        self.feed = Feed(self.bus, durable=self.cfg.consumer, subjects=SUBJECTS, ack_wait_s=self.cfg.ack_wait_s)
        await self.feed.bind()
        self.ready.set()
        log.info("follower_started", target=self.target.name, runtime=self.target.runtime,
                 serving=self.state.serving, desired=self.state.desired, consumer=self.cfg.consumer)

    async def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.bus is not None:
            await self.bus.close()
        await self.target.close()

    async def run(self, stop: asyncio.Event) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._stop = stop
        try:
            await self.start()
            self._scheduler = AsyncIOScheduler(timezone="UTC")
            self._scheduler.add_job(self.tick, "interval", seconds=self.cfg.reconcile_interval_s, id="reconcile",
                                    coalesce=True, max_instances=1)
            self._scheduler.start()
            self._wake.set()  # converge on what the record says, now
            converger = asyncio.create_task(self._converger(stop), name="follower-converge")
            try:
                await self.feed.run(self.handle, stop)
            finally:
                self._wake.set()
                try:  # a swap in flight may finish; one that hangs (a runtime that does not answer) is left:
                    await asyncio.wait_for(converger, STOP_GRACE_S)  # the next start converges from the truth
                except TimeoutError:
                    log.warning("follower_stopped_mid_swap", desired=self.state.desired)
        finally:
            await self.close()

    def status(self) -> dict[str, Any]:
        """The follower's view: desired vs served, and since when and why they differ."""
        s = self.state
        d = s.diverged
        return {"target": self.target.name, "runtime": self.target.runtime, "desired": s.desired,
                "serving": s.serving, "served_generation": s.served_generation,
                "converged": d is None and s.desired is not None and s.reported == desired_key(s.desired),
                "diverged": f"diverged since {d['since']}: {d['why']}" if d else None,
                "dead_lettered": len(s.dead)}

    # ---------------------------------------------------------------- the desired state

    async def tick(self) -> None:
        """The timer: the daemon's desired state, then converge."""
        await self.read_desired()
        self._wake.set()

    async def read_desired(self) -> None:
        """`academy.status`'s champion and generation; a newer generation than the follower's record whose
        promotion it has seen becomes desired (the event itself brings the files: an unseen version waits
        for it). A daemon that does not answer changes nothing."""
        if self.bus is None or self.bus.nc is None:
            return
        try:
            msg = await self.bus.nc.request("academy.status", b"{}", timeout=5)
            status = json.loads(msg.data or b"{}")
        except Exception as exc:  # the daemon is down or busy: the record's desired state stands
            log.debug("desired_state_unread", error=f"{type(exc).__name__}: {exc}")
            return
        gen, version = status.get("champion_generation"), status.get("champion")
        d = self.state.desired
        if not isinstance(gen, int) or gen < 1 or (d is not None and (d.get("generation") or 0) >= gen):
            return
        if version is not None and version not in self.state.known:
            self._diverge(f"the daemon's champion is {version} (generation {gen}); waiting for its model.promoted")
            return
        self.state.desired = {"version": version, "generation": gen, "event_id": f"status-g{gen}",
                              "subject": "model.promoted" if version else "model.rolled_back",
                              "at": status.get("now"), "from_version": self.state.serving}
        self.state.save()
        log.info("desired_from_daemon", version=version, generation=gen)

    def accept(self, subject: str, event: dict[str, Any]) -> bool:
        """Record what `event` makes desired; False: it changes nothing (an older generation, or the other
        event of the same move)."""
        version = event["version"] if subject == "model.promoted" else event.get("to_version")
        if subject == "model.promoted":
            self.state.known[event["version"]] = event
        gen = event.get("generation")
        d = self.state.desired
        newest = max((d or {}).get("generation") or 0, self.state.served_generation or 0)
        if gen is not None and gen <= newest:
            if gen < newest:
                log.info("event_superseded", subject=subject, event_id=event["event_id"], version=version,
                         generation=gen, desired_generation=newest)
            return False
        self.state.desired = {"version": version, "generation": gen, "event_id": event["event_id"],
                              "subject": subject, "at": event.get("at"),
                              "from_version": event.get("from_version") if subject == "model.rolled_back"
                              else event.get("previous_version")}
        return True

    # ---------------------------------------------------------------- one event

    async def handle(self, item: Inbound) -> Outcome:
        model = ModelPromoted if item.subject == "model.promoted" else ModelRolledBack
        try:
            raw = json.loads(item.data)
            model.model_validate(raw)
        except (ValueError, ValidationError) as exc:
            return Reject("invalid_event", f"{item.subject} does not match the contract: {exc}"[:1000])
        event_id = raw["event_id"]
        try:
            done = self.state.done.get(event_id)
            if done is not None:
                if "subject" in done:  # a redelivery: the recorded outcome again (the server drops a copy)
                    await self._publish(done["subject"], done["payload"])
                return Ack()
            if not self.accept(item.subject, raw):
                self.state.done.setdefault(event_id, {"superseded": True})
            self.state.save()
            self._wake.set()  # also for the model.promoted of a rollback: it brings the files the move waits for
            return Ack()
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            if item.num_delivered < self.cfg.max_tries:
                log.warning("event_failed", event_id=event_id, error=why, delivery=item.num_delivered)
                return Retry(min(self.cfg.reconcile_interval_s, self.cfg.retry_initial_s * 2 ** item.num_delivered),
                             "event_failed")
            self.state.dead[event_id] = why[:1000]
            self.state.save()
            log.error("event_dead_lettered", event_id=event_id, subject=item.subject, error=why,
                      deliveries=item.num_delivered)
            return Reject("dead_lettered", why)

    async def _publish(self, subject: str, payload: dict[str, Any]) -> None:
        await self.bus.publish(subject, json.dumps(payload).encode(), payload["event_id"])
        self.handled.append((subject, payload))
        log.info(subject, source_event_id=payload["source_event_id"], version=payload["version"],
                 serving=payload["serving"], generation=payload.get("generation"), reason=payload.get("reason"))

    # ---------------------------------------------------------------- converging

    async def _converger(self, stop: asyncio.Event) -> None:
        from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

        while not stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            if stop.is_set():
                return
            try:
                async for attempt in AsyncRetrying(
                        retry=retry_if_exception_type((TargetError, _Again)), sleep=self._sleep, reraise=True,
                        wait=wait_exponential(multiplier=self.cfg.retry_initial_s, max=self.cfg.reconcile_interval_s)):
                    with attempt:
                        if not stop.is_set():
                            await self.converge()
            except (TargetError, _Again):  # only when stopping
                pass
            except Exception:
                log.exception("converge_failed")

    async def _sleep(self, seconds: float) -> None:
        """Backoff between tries, cut short by an event, the timer, or stopping."""
        self._wake.clear()
        stop = self._stop
        waits = [asyncio.create_task(self._wake.wait())] + ([asyncio.create_task(stop.wait())] if stop else [])
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self._wake.clear()

    def _diverge(self, why: str) -> None:
        if self.state.diverged is None:
            self.state.diverged = {"since": self.clock().isoformat(), "why": why[:1000]}
        else:
            self.state.diverged["why"] = why[:1000]
        self.converged.clear()
        self.state.save()

    async def converge(self) -> None:
        """One try at making the runtime serve the desired state. Raises TargetError (the runtime did not
        answer) or _Again (an unexpected failure, under max_tries) to be tried again with backoff."""
        async with self._lock:
            d = self.state.desired
            if d is None:
                return
            key = desired_key(d)
            if key in self.state.settled:
                return
            version = d["version"]
            promoted = self.state.known.get(version) if version else self.state.known.get(d.get("from_version") or "")
            if version is not None and promoted is None:
                self._diverge(f"{version} is desired but no model.promoted of it was seen here; waiting for it")
                return
            try:
                have = await self.target.serving()
                if have == version and self.state.serving == version and self.state.reported == key:
                    done = self.state.done.get(d["event_id"]) or {}
                    if done.get("subject") and not done.get("published"):  # the bus was away when it was reached
                        await self._publish(done["subject"], done["payload"])
                        done["published"] = True
                    if self.state.diverged is not None or done.get("published"):
                        self.state.diverged = None
                        self.state.save()
                    self.converged.set()
                    return
                subject, payload = await self.deploy(d["subject"], d, version, promoted)
            except TargetError as exc:
                self._diverge(f"{self.target.name} at {self.target.runtime}: {exc}")
                log.warning("runtime_unavailable", desired=version, generation=d.get("generation"), error=str(exc))
                if key not in self.state.failure_reported:  # reported once per generation; retried for ever
                    self.state.failure_reported.append(key)
                    _, failed = self._failed(d["subject"], d, version, self.state.serving,
                                             Refused("target_failed", str(exc)), {}, [], None, {})
                    failed["event_id"] = _outcome_id("unreachable", d)
                    self.state.save()
                    await self._publish("model.deploy_failed", failed)
                raise
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                self.state.tries[key] = self.state.tries.get(key, 0) + 1
                log.exception("deploy_crashed", desired=version, generation=d.get("generation"),
                              tries=self.state.tries[key])
                if self.state.tries[key] < self.cfg.max_tries:
                    self._diverge(f"deploying {version or 'the base model'} failed: {why}")
                    raise _Again(why) from exc
                subject, payload = self._failed(d["subject"], d, version, self.state.serving,
                                                Refused("dead_lettered", f"{self.state.tries[key]} tries failed; "
                                                        f"the last: {why}"), {}, [], None, {})
                self.state.dead[d["event_id"]] = why[:1000]
            if subject == "model.deployed":
                self.state.serving = version
                self.state.served_generation = d.get("generation")
                self.state.reported = key
                self.state.diverged = None
                self.state.tries.pop(key, None)
                self.converged.set()
            else:
                self.state.settled[key] = payload["reason"]
                self.state.serving = payload["serving"]  # as read back after the refusal (Venom may have moved)
                self._diverge(f"{version or 'the base model'} (generation {d.get('generation')}) was not deployed: "
                              f"{payload['reason']}"
                              + (f" {payload['reason_code']}" if payload.get("reason_code") else "")
                              + f": {payload['detail'][:300]}")
            self.state.done[d["event_id"]] = done = {"subject": subject, "payload": payload, "published": False}
            self.state.save()
            await self._publish(subject, payload)
            done["published"] = True
            self.state.save()

    async def deploy(self, subject: str, event: dict[str, Any], version: str | None,
                     promoted: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """Verify, stage, probe, switch (or not) one version; None is the base model."""
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        checks: dict[str, Any] = {}
        previous = await self.target.serving()
        files: dict[str, Any] = {}
        probe_items, probe_source = load_probe(promoted or {}, self.settings)
        if version is None:
            probe_items = [{**p, "expected": p.get("base_expected")} for p in probe_items]
        checks["probe_source"] = probe_source
        try:
            if version is not None:
                announced = {**(promoted or {}), "gguf_sha256": announced_gguf_sha256(promoted or {})}
                files = {**(await asyncio.to_thread(check_files, announced)),
                         "adapter_path": (promoted or {})["adapter_path"],
                         "modelfile_path": (promoted or {}).get("modelfile_path"),
                         "base_model": (promoted or {}).get("base_model")}
                checks.update({k: files.get(k) for k in ("adapter_sha256", "gguf_sha256")})
                checks["gguf_sha256_announced"] = bool(announced["gguf_sha256"])
                keys = await asyncio.to_thread(gguf_keys, Path(files["gguf_path"])) if files.get("gguf_path") else {}
                if (promoted or {}).get("base_sha256"):  # what the event says, checked like the GGUF's own keys
                    keys = {**keys, "event.base_sha256": promoted["base_sha256"]}  # type: ignore[index]
                checks["base"] = check_base(keys, await self.target.base(), require=self.cfg.require_base_identity,
                                            adapter=files.get("gguf_path") or files["adapter_path"])
            timings["verify_s"] = time.perf_counter() - t0
            if previous == version and self.state.serving == version:
                probe, agreement = await self._probe(version, probe_items, timings)
                return self._deployed(subject, event, version, previous, probe, agreement, timings, checks, t0, noop=True)
            t = time.perf_counter()
            if version is not None:
                checks.update(await self.target.stage(version, files))
            timings["load_s"] = time.perf_counter() - t
            if self.target.probe_first:
                probe, agreement = await self._probe(version, probe_items, timings)
                why = self._probe_failure(probe, agreement)
                if why:
                    if version is not None and version != previous:
                        await self.target.discard(version)
                    raise _ProbeFailed(why, probe, agreement)
                await self._switch(version, files, timings)
            else:
                await self._switch(version, files, timings)
                probe, agreement = await self._probe(version, probe_items, timings)
                why = self._probe_failure(probe, agreement)
                if why:
                    back = self.state.known.get(previous or "")
                    if previous is None or back is not None:  # not to something the Academy never promoted
                        await self.target.switch(previous, {"adapter_path": back["adapter_path"]} if back else None)
                    raise _ProbeFailed(why, probe, agreement)
        except _ProbeFailed as exc:
            return self._failed(subject, event, version, previous, Refused("probe_failed", exc.why), timings,
                                exc.probe, exc.agreement, checks, t0)
        except Refused as exc:
            failed = self._failed(subject, event, version, previous, exc, timings, [], None, checks, t0)
            failed[1]["serving"] = await self._serving_now(previous)  # a refusal may leave chat elsewhere (Venom)
            return failed
        if previous is not None and previous != version:
            await self.target.discard(previous)
        self.state.serving = version
        return self._deployed(subject, event, version, previous, probe, agreement, timings, checks, t0)

    async def _serving_now(self, fallback: str | None) -> str | None:
        try:
            return await self.target.serving()
        except TargetError:
            return fallback

    async def _switch(self, version: str | None, files: dict[str, Any], timings: dict[str, float]) -> None:
        t = time.perf_counter()
        await self.target.switch(version, files or None)
        timings["switch_s"] = time.perf_counter() - t

    async def _probe(self, version: str | None, items: list[dict[str, Any]],
                     timings: dict[str, float]) -> tuple[list[dict[str, Any]], float | None]:
        t = time.perf_counter()
        results: list[dict[str, Any]] = []
        for item in items:
            messages = item["messages"]
            prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
            expected = item.get("expected")
            r: dict[str, Any] = {"prompt": str(prompt)[:PROMPT_CHARS], "expected": expected}
            t1 = time.perf_counter()
            try:
                answer = await self.target.ask(version, messages, int(item.get("max_tokens") or self.cfg.probe_max_tokens))
                r.update(answer=answer, match=_matches(answer, expected) if expected is not None else None)
            except TargetError as exc:
                r.update(answer=None, match=False if expected is not None else None, error=str(exc)[:500])
            r["latency_s"] = time.perf_counter() - t1
            results.append(r)
        timings["probe_s"] = time.perf_counter() - t
        judged = [r for r in results if r["expected"] is not None]
        agreement = sum(bool(r["match"]) for r in judged) / len(judged) if judged else None
        return results, agreement

    def _probe_failure(self, probe: list[dict[str, Any]], agreement: float | None) -> str | None:
        errors = [r for r in probe if r.get("error")]
        if errors:
            return f"{len(errors)} of {len(probe)} probe prompts failed: {errors[0]['error']}"
        empty = [r for r in probe if not (r.get("answer") or "").strip()]
        if empty:
            return f"{len(empty)} of {len(probe)} probe answers are empty (first: {empty[0]['prompt']!r})"
        if agreement is not None and agreement < self.cfg.min_agreement:
            return (f"{agreement:.0%} of the probe answers agree with the arena's (at least "
                    f"{self.cfg.min_agreement:.0%} needed)")
        return None

    # ---------------------------------------------------------------- outcomes

    def _common(self, subject: str, event: dict[str, Any], version: str | None, previous: str | None,
                serving: str | None, probe: list[dict[str, Any]], agreement: float | None,
                timings: dict[str, float], checks: dict[str, Any], t0: float | None
                ) -> tuple[datetime, dict[str, Any]]:
        """When, and the body both outcomes share (the envelope is academyd.events')."""
        now = self.clock()
        if t0 is not None:
            timings["total_s"] = time.perf_counter() - t0
        try:
            at = datetime.fromisoformat(str(event["at"]).replace("Z", "+00:00"))
            timings["since_event_s"] = max(0.0, (now - at).total_seconds())
        except (KeyError, ValueError):
            pass
        return now, {
            "source_event_id": event["event_id"], "source_subject": subject, "version": version,
            "target": self.target.name, "runtime": self.target.runtime, "serving": serving, "previous": previous,
            "probe": probe, "agreement": agreement, "timings": {k: round(v, 4) for k, v in timings.items()},
            "checks": checks, "generation": event.get("generation"),
        }

    def _deployed(self, subject: str, event: dict[str, Any], version: str | None, previous: str | None,
                  probe: list[dict[str, Any]], agreement: float | None, timings: dict[str, float],
                  checks: dict[str, Any], t0: float, *, noop: bool = False) -> tuple[str, dict[str, Any]]:
        now, body = self._common(subject, event, version, previous, version, probe, agreement, timings, checks, t0)
        return "model.deployed", events.envelope("model.deployed", _outcome_id("deployed", event), now,
                                                 {**body, "noop": noop}).payload

    def _failed(self, subject: str, event: dict[str, Any], version: str | None, previous: str | None,
                exc: Refused, timings: dict[str, float], probe: list[dict[str, Any]], agreement: float | None,
                checks: dict[str, Any], t0: float | None = None) -> tuple[str, dict[str, Any]]:
        now, body = self._common(subject, event, version, previous, previous, probe, agreement, timings, checks, t0)
        payload = events.envelope("model.deploy_failed", _outcome_id("deploy-failed", event), now,
                                  {**body, "reason": exc.reason, "detail": exc.detail[:2000],
                                   "reason_code": exc.code}).payload
        log.warning("deploy_refused", version=version, reason=exc.reason, code=exc.code, detail=exc.detail[:500],
                    still_serving=previous)
        return "model.deploy_failed", payload


class _Again(Exception):
    """An unexpected failure of one try, to be tried again (up to follower.max_tries)."""


class _ProbeFailed(Exception):
    def __init__(self, why: str, probe: list[dict[str, Any]], agreement: float | None) -> None:
        super().__init__(why)
        self.why, self.probe, self.agreement = why, probe, agreement
