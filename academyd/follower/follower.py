"""The follower: Venom's side of the hot swap.

A durable JetStream consumer on `model.promoted` and `model.rolled_back` (the Academy's outbound stream),
one event at a time and in order. For each event:

1. already handled (its event id is in the follower's record)? publish the recorded outcome again (same
   `Nats-Msg-Id`, so the server drops a copy that did get out) and ack: a redelivery never swaps twice;
2. verify: the adapter's files hash to `adapter_sha256` (and the GGUF to `gguf_sha256` when announced),
   and the GGUF adapter's base identity (`general.base_model.*`) is the base the runtime serves;
3. stage the version beside the one serving, ask it the frozen probe prompts (chat messages, greedy), and
   compare with the answers the arena's runtime gave; below `follower.min_agreement` it is not switched
   to and is freed again, and the old version keeps serving;
4. switch, free the old one, record the outcome, publish `model.deployed` or `model.deploy_failed` (probe
   results and timings), and only then ack.

A runtime that does not answer is retried with the consumer's redelivery (a few times), then reported as
`model.deploy_failed` (`target_failed`). `model.rolled_back` goes back the same way: to the version it
names (when the follower has seen its promotion) or to the base model (`to_version` null).

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
TARGET_RETRIES = 4
PROMPT_CHARS = 200


def _outcome_id(prefix: str, event: dict[str, Any]) -> str:
    return f"{prefix}-{event['event_id']}"[:200]


class State:
    """The follower's record (a JSON file, replaced atomically): outcomes by event id, promotions seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data: dict[str, Any] = {}
        if path.is_file():
            data = json.loads(path.read_text())
        self.done: dict[str, dict[str, Any]] = data.get("done", {})
        self.known: dict[str, dict[str, Any]] = data.get("known", {})
        self.serving: str | None = data.get("serving")

    def save(self) -> None:
        while len(self.done) > KEEP_DONE:
            self.done.pop(next(iter(self.done)))
        atomic_write_json(self.path, {"serving": self.serving, "done": self.done, "known": self.known}, indent=None)


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
    the daemon's identity (it publishes model.deployed / model.deploy_failed, which only `academyd` may)."""
    from academyd.bus import BusError
    from academyd.nats_auth import DAEMON, as_identity, password_file, read_password

    cfg = settings.nats
    if cfg.url or cfg.user or cfg.token or cfg.creds_file:
        return cfg
    password = read_password(settings.nats_dir, DAEMON)
    if password is None:
        raise BusError(f"no credentials for the embedded NATS server ({password_file(settings.nats_dir, DAEMON)} is "
                       "missing): start the daemon in this data directory first, pass its --data-dir, or "
                       "--nats-url / ACADEMY_NATS__URL with nats.user/password or creds_file")
    return as_identity(cfg, DAEMON, password)


class Follower:
    """Consumes the Academy's promotions and rollbacks and makes a runtime serve what they say."""

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

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        from academyd.bus import Bus, Feed
        from academyd.commands.common import daemon_url

        await self.target.start()
        self.target.assume(self.state.serving)
        await self.reconcile()
        self.bus = Bus(follower_nats(self.settings))
        await self.bus.connect(daemon_url(self.settings))
        await self.bus.ensure_streams()
        self.feed = Feed(self.bus, durable=self.cfg.consumer, subjects=SUBJECTS, ack_wait_s=self.cfg.ack_wait_s)
        await self.feed.bind()
        self.ready.set()
        log.info("follower_started", target=self.target.name, runtime=self.target.runtime,
                 serving=self.state.serving, consumer=self.cfg.consumer)

    async def reconcile(self) -> None:
        """A runtime that restarted (a fresh endpoint serves the base) gets the recorded version back."""
        want = self.state.serving
        have = await self.target.serving()
        if want is None or have == want or want not in self.state.known:
            return
        event = self.state.known[want]
        subject, payload = await self.deploy("model.promoted", event, want, event)
        log.info("runtime_reconciled", wanted=want, had=have, outcome=subject, serving=payload["serving"])
        if subject != "model.deployed":
            self.state.serving = payload["serving"]
            self.state.save()

    async def close(self) -> None:
        if self.bus is not None:
            await self.bus.close()
        await self.target.close()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.start()
            await self.feed.run(self.handle, stop)
        finally:
            await self.close()

    # ---------------------------------------------------------------- one event

    async def handle(self, item: Inbound) -> Outcome:
        model = ModelPromoted if item.subject == "model.promoted" else ModelRolledBack
        try:
            raw = json.loads(item.data)
            model.model_validate(raw)
        except (ValueError, ValidationError) as exc:
            return Reject("invalid_event", f"{item.subject} does not match the contract: {exc}"[:1000])
        event_id = raw["event_id"]
        done = self.state.done.get(event_id)
        if done is None:
            try:
                subject, payload = await self.apply(item.subject, raw)
            except TargetError as exc:
                if item.num_delivered < TARGET_RETRIES:
                    log.warning("target_unavailable", event_id=event_id, error=str(exc), delivery=item.num_delivered)
                    return Retry(min(30.0, 2.0 * item.num_delivered), "target_unavailable")
                subject, payload = self._failed(item.subject, raw, raw.get("version") or raw.get("to_version"),
                                                await self._serving_or_none(), Refused("target_failed", str(exc)),
                                                {}, [], None, {})
            done = {"subject": subject, "payload": payload}
            self.state.done[event_id] = done
            self.state.save()
        await self.bus.publish(done["subject"], json.dumps(done["payload"]).encode(), done["payload"]["event_id"])
        self.handled.append((done["subject"], done["payload"]))
        log.info(done["subject"], source_event_id=event_id, version=done["payload"]["version"],
                 serving=done["payload"]["serving"], reason=done["payload"].get("reason"))
        return Ack()

    async def _serving_or_none(self) -> str | None:
        try:
            return await self.target.serving()
        except TargetError:
            return self.state.serving

    async def apply(self, subject: str, event: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Do what the event says to the target; return the outcome (subject, payload) to publish."""
        if subject == "model.promoted":
            self.state.known[event["version"]] = event
            return await self.deploy(subject, event, event["version"], event)
        to = event.get("to_version")
        if to is None:
            previous = self.state.known.get(event.get("from_version") or "")
            return await self.deploy(subject, event, None, previous)
        known = self.state.known.get(to)
        if known is None:
            return self._failed(subject, event, to, await self.target.serving(),
                                Refused("unknown_version", f"no model.promoted of {to} was seen here; the "
                                        "model.promoted that follows the rollback will bring it"), {}, [], None, {})
        return await self.deploy(subject, event, to, known)

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
                         "modelfile_path": (promoted or {}).get("modelfile_path")}
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
                    await self.target.switch(previous, {"adapter_path": back["adapter_path"]} if back else None)
                    raise _ProbeFailed(why, probe, agreement)
        except _ProbeFailed as exc:
            return self._failed(subject, event, version, previous, Refused("probe_failed", exc.why), timings,
                                exc.probe, exc.agreement, checks, t0)
        except Refused as exc:
            return self._failed(subject, event, version, previous, exc, timings, [], None, checks, t0)
        if previous is not None and previous != version:
            await self.target.discard(previous)
        self.state.serving = version
        return self._deployed(subject, event, version, previous, probe, agreement, timings, checks, t0)

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
            "checks": checks,
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
                                  {**body, "reason": exc.reason, "detail": exc.detail[:2000]}).payload
        log.warning("deploy_refused", version=version, reason=exc.reason, detail=exc.detail[:500],
                    still_serving=previous)
        return "model.deploy_failed", payload


class _ProbeFailed(Exception):
    def __init__(self, why: str, probe: list[dict[str, Any]], agreement: float | None) -> None:
        super().__init__(why)
        self.why, self.probe, self.agreement = why, probe, agreement
