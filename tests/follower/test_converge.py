"""The follower converges on the champion; it does not replay (#19). Real nats-server, the Venom stand-in
(tests/fixtures/venom.py), the follower in-process or as `academyd follow` processes.

The outage test's length is a parameter (ACADEMY_TEST_OUTAGE_S, default 6 s = three timer periods): the
follower's retry loop does not depend on how long the runtime was away (backoff capped at the timer period,
no give-up), so CI runs a short outage with a 2 s period; `ACADEMY_TEST_OUTAGE_S=300` runs the 5-minute one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from fixtures.follower import QUESTION, Outcomes, make_version, publish_event
from fixtures.nats import daemon_cmd, daemon_env
from fixtures.venom import BASE_MODEL_ID, VenomStandIn, venom_settings

from academyd.follower import Follower
from schemas.models import ModelDeployed, ModelDeployFailed

PERIOD_S = 2.0
OUTAGE_S = float(os.environ.get("ACADEMY_TEST_OUTAGE_S", "6"))


def version(settings_data: Path, name: str, seed: int, served_base: tuple[Path, dict[str, str]],
            venom: VenomStandIn, generation: int) -> dict[str, Any]:
    gguf, identity = served_base
    answer = f"Ziggy the octopus ({name})."
    p = make_version(settings_data, name, gguf, identity, answer, seed=seed)
    venom.runtime.answers_by_gguf[hashlib.sha256(Path(p["gguf_path"]).read_bytes()).hexdigest()] = {QUESTION: answer}
    return {**p, "generation": generation}


async def running(settings: Any) -> tuple[Follower, asyncio.Event, asyncio.Task[None]]:
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 30)
    return follower, stop, task


def of(outcomes: Outcomes, subject: str, generation: int) -> list[dict[str, Any]]:
    return [p for s, p in outcomes.items if s == subject and p.get("generation") == generation]


async def test_an_outage_across_a_promotion_ends_in_the_champion_within_one_timer_period(
        make_settings: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn, nc: Any) -> None:
    settings = make_settings(follower=venom_settings(venom, base_gguf=served_base[0], reconcile_interval_s=PERIOD_S,
                                                     retry_initial_s=0.25))
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = version(settings.data_dir, "v1", 1, served_base, venom, 1)
    v2 = version(settings.data_dir, "v2", 2, served_base, venom, 2)
    follower, stop, task = await running(settings)
    try:
        await publish_event(js, "model.promoted", v1)
        assert (await outcomes.wait(v1["event_id"], timeout=30))[0] == "model.deployed"

        await venom.stop()  # Venom (and with it the chat runtime's deploys) is away
        await publish_event(js, "model.promoted", v2)
        got, failed = await outcomes.wait(v2["event_id"], timeout=30)
        assert got == "model.deploy_failed" and failed["reason"] == "target_failed", failed
        ModelDeployFailed.model_validate(failed)
        assert failed["generation"] == 2 and failed["serving"] == "v1"
        status = follower.status()
        assert status["diverged"].startswith("diverged since ") and "ClientConnectorError" in status["diverged"]
        await asyncio.sleep(OUTAGE_S)
        assert not follower.converged.is_set()

        back = time.monotonic()
        await venom.start()
        for _ in range(int((PERIOD_S * 3 + 30) / 0.05)):
            if of(outcomes, "model.deployed", 2):
                break
            await asyncio.sleep(0.05)
        waited = time.monotonic() - back
        deployed = of(outcomes, "model.deployed", 2)
        assert len(deployed) == 1, outcomes.items
        ModelDeployed.model_validate(deployed[0])
        assert deployed[0]["serving"] == "v2" and venom.chat_model == "venom-adapter-v2"
        # The first try after the runtime returned came within one timer period (the backoff's cap); the
        # rest is the deploy itself, as the follower timed it.
        assert waited - deployed[0]["timings"]["total_s"] <= PERIOD_S * 1.5, (waited, deployed[0]["timings"])
        await asyncio.sleep(PERIOD_S * 1.5)  # a timer tick later: nothing more to say
        assert len(of(outcomes, "model.deployed", 2)) == 1 and len(of(outcomes, "model.deploy_failed", 2)) == 1
        assert follower.status()["converged"] and follower.status()["diverged"] is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_poison_event_is_dead_lettered_and_the_next_applies(
        make_settings: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn, nc: Any) -> None:
    settings = make_settings(follower=venom_settings(venom, base_gguf=served_base[0], max_tries=3,
                                                     retry_initial_s=0.05, reconcile_interval_s=PERIOD_S))
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = version(settings.data_dir, "v1", 1, served_base, venom, 1)
    v2 = version(settings.data_dir, "v2", 2, served_base, venom, 2)
    v3 = version(settings.data_dir, "v3", 3, served_base, venom, 3)
    broken = settings.models_dir / "v2" / "arena-probes.json"
    broken.write_text('{"probes": [{"messages": ')  # the arena's probes file, cut short
    v2["probes_path"] = str(broken)
    follower, stop, task = await running(settings)
    try:
        await publish_event(js, "model.promoted", v1)
        assert (await outcomes.wait(v1["event_id"], timeout=30))[0] == "model.deployed"
        await publish_event(js, "model.promoted", v2)
        got, dead = await outcomes.wait(v2["event_id"], timeout=30)
        assert got == "model.deploy_failed" and dead["reason"] == "dead_lettered", dead
        assert "3 tries failed" in dead["detail"] and "JSONDecodeError" in dead["detail"]
        assert dead["serving"] == "v1" and venom.activations() == ["v1"]  # v2 never reached Venom
        await publish_event(js, "model.promoted", v3)
        got, deployed = await outcomes.wait(v3["event_id"], timeout=30)
        assert got == "model.deployed" and deployed["serving"] == "v3" and deployed["generation"] == 3, deployed
        assert venom.activations() == ["v1", "v3"]
        assert follower.status()["dead_lettered"] == 1 and await follower.feed.pending() == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_follower_killed_mid_swap_converges_after_restart(
        tmp_path: Path, nats_server: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn,
        nc: Any) -> None:
    data = tmp_path / "data"
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = version(data, "v1", 1, served_base, venom, 1)
    v2 = version(data, "v2", 2, served_base, venom, 2)
    env = daemon_env(
        ACADEMY_FOLLOWER__TARGET="venom", ACADEMY_FOLLOWER__VENOM_URL=venom.url,
        ACADEMY_FOLLOWER__VENOM_CHAT_URL=venom.runtime.url + "/v1/chat/completions",
        ACADEMY_FOLLOWER__VENOM_RUNTIME_ID="ollama", ACADEMY_FOLLOWER__VENOM_MODEL_ID=BASE_MODEL_ID,
        ACADEMY_FOLLOWER__VENOM_BASE_MODELS=json.dumps({"smollm2-135m-instruct": BASE_MODEL_ID,
                                                        "SmolLM2-135M-Instruct": BASE_MODEL_ID}),
        ACADEMY_FOLLOWER__BASE_GGUF=str(served_base[0]), ACADEMY_FOLLOWER__RECONCILE_INTERVAL_S=str(PERIOD_S))

    async def follow() -> subprocess.Popen[str]:
        proc = subprocess.Popen(daemon_cmd("follow", "--data-dir", str(data), "--nats-url", nats_server.url),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # its durable consumer exists (a restarted one finds it, with what it missed)
            try:
                await js.consumer_info("ACADEMY_EVENTS", "academy-follower")
                return proc
            except Exception:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                await asyncio.sleep(0.05)
        return proc

    proc = await follow()
    try:
        await publish_event(js, "model.promoted", v1)
        assert (await outcomes.wait(v1["event_id"], timeout=60))[0] == "model.deployed"
        venom.hold_activate = asyncio.Event()  # Venom's `ollama create` of v2 takes its time ...
        await publish_event(js, "model.promoted", v2)
        for _ in range(1200):
            if any(c["route"] == "activate" and "status" not in c for c in venom.calls):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no activate of v2 reached Venom: {venom.calls}")
        # v1 left; v2 is Venom's active adapter (its registry flips first) but chat is not on it yet
        assert venom.active == "v2" and venom.chat_model == BASE_MODEL_ID
        proc.send_signal(signal.SIGKILL)  # ... and the follower dies in the middle of the swap
        await asyncio.to_thread(proc.wait, 30)
        venom.hold_activate.set()
        assert not of(outcomes, "model.deployed", 2)

        proc = await follow()
        for _ in range(1200):
            if of(outcomes, "model.deployed", 2):
                break
            await asyncio.sleep(0.05)
        deployed = of(outcomes, "model.deployed", 2)
        assert len(deployed) == 1 and deployed[0]["serving"] == "v2", outcomes.items
        assert venom.chat_model == "venom-adapter-v2" and venom.active == "v2"
        state = json.loads((data / "follower" / "state-venom.json").read_text())
        assert state["serving"] == "v2" and state["served_generation"] == 2 and state["diverged"] is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            raise AssertionError(f"academyd follow did not stop on SIGTERM: {err[-3000:]}") from None
    assert proc.returncode == 0, err[-2000:]


async def test_chat_switched_behind_the_followers_back_is_put_back_by_the_timer(
        make_settings: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn, nc: Any) -> None:
    settings = make_settings(follower=venom_settings(venom, base_gguf=served_base[0], reconcile_interval_s=PERIOD_S))
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = version(settings.data_dir, "v1", 1, served_base, venom, 1)
    follower, stop, task = await running(settings)
    try:
        await publish_event(js, "model.promoted", v1)
        assert (await outcomes.wait(v1["event_id"], timeout=30))[0] == "model.deployed"
        # Someone deactivates v1 in Venom's UI: chat goes back to the base. No event says so.
        venom.active, venom.chat_model = None, BASE_MODEL_ID
        changed = time.monotonic()
        for _ in range(int(PERIOD_S * 3 / 0.05)):
            if venom.chat_model == "venom-adapter-v1":
                break
            await asyncio.sleep(0.05)
        assert venom.chat_model == "venom-adapter-v1" and venom.active == "v1"
        assert time.monotonic() - changed <= PERIOD_S * 2  # the next tick, plus the deploy
        assert venom.activations() == ["v1", "v1"]
        again = of(outcomes, "model.deployed", 1)
        assert len({p["event_id"] for p in again}) == 1  # the same outcome (one msg id): the stream keeps one
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
