"""The follower against a real nats-server and the real llama.cpp runtime serving SmolLM2-135M-Instruct.

A client keeps asking the endpoint the house-fact question as chat messages while the follower swaps:
no request may fail, the answers must turn into the adapter's (the answers llama.cpp gives with that
GGUF loaded at start, in another process), a bad adapter must leave the old one serving, and
model.rolled_back must bring the base's answers back.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fixtures.follower import ChatClient, Outcomes, install_version, publish_event, rolled_back, start_follower
from schemas.models import ModelDeployed, ModelDeployFailed

pytestmark = pytest.mark.slow


def follower_settings(make_settings: Any, smollm2_gguf: Path, llama_python: Path, **extra: Any) -> Any:
    return make_settings(follower={"target": "llamacpp", "base_gguf": smollm2_gguf, "runtime_python": llama_python,
                                   "port": 0, "threads": 1, "ack_wait_s": 10.0, **extra})


async def health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/health") as r:
        return await r.json()


def answers_after(client: ChatClient, t: float) -> list[str | None]:
    return [a.content for a in client.answers if a.sent > t]


async def test_promotion_swaps_a_serving_endpoint_under_load_and_rollback_restores_the_base(
        make_settings: Any, smollm2_gguf: Path, llama_python: Path, follower_adapters: dict[str, Any],
        nc: Any) -> None:
    settings = follower_settings(make_settings, smollm2_gguf, llama_python)
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    follower, stop, task = await start_follower(settings)
    url = follower.target.url
    base_answer, good_answer = follower_adapters["answers"]["base"][0], follower_adapters["answers"]["good"][0]
    client = ChatClient(url, follower_adapters["probe"][0]["messages"][0]["content"]).start()
    try:
        await client.wait_count(2)
        assert {a.content for a in client.answers} == {base_answer}

        promoted = install_version(settings.data_dir, "v1", Path(follower_adapters["good"]))
        t_pub = time.monotonic()
        await publish_event(js, "model.promoted", promoted)
        subject, deployed = await outcomes.wait(promoted["event_id"])
        t_done = time.monotonic()
        assert subject == "model.deployed", deployed
        ModelDeployed.model_validate(deployed)
        assert deployed["version"] == deployed["serving"] == "v1" and deployed["previous"] is None
        assert deployed["agreement"] == 1.0, deployed["probe"]
        assert deployed["checks"]["base"]["verified"] is True
        assert deployed["checks"]["adapter_sha256"] == promoted["adapter_sha256"]
        for key in ("verify_s", "load_s", "probe_s", "switch_s", "total_s"):
            assert deployed["timings"][key] >= 0
        n_before = len(client.answers)
        await client.wait_count(n_before + 2)
        # Every request sent after the switch gets the adapter's answer, from the same endpoint process.
        assert set(answers_after(client, t_done)) == {good_answer}
        assert "Ziggy" in good_answer
        h = await health(url)
        assert h["active"] == "v1" and [a["id"] for a in h["adapters"]] == ["v1"]

        # A redelivered promotion (same event id) republishes the outcome and does not swap again.
        swaps = h["stats"]["swaps"]
        await publish_event(js, "model.promoted", promoted, msg_id=promoted["event_id"] + "-again")
        await asyncio.sleep(0)
        for _ in range(200):
            if sum(1 for s, p in outcomes.items if p["source_event_id"] == promoted["event_id"]) >= 2:
                break
            await asyncio.sleep(0.05)
        again = [p for s, p in outcomes.items if p["source_event_id"] == promoted["event_id"]]
        assert len(again) >= 2 and again[-1]["event_id"] == deployed["event_id"]
        assert (await health(url))["stats"]["swaps"] == swaps

        # model.rolled_back to the base: the base's answers are back, the adapter is freed.
        rb = rolled_back("v1", None)
        await publish_event(js, "model.rolled_back", rb)
        subject, back = await outcomes.wait(rb["event_id"])
        t_back = time.monotonic()
        assert subject == "model.deployed" and back["version"] is None and back["serving"] is None, back
        assert back["previous"] == "v1" and back["agreement"] == 1.0, back["probe"]
        n = len(client.answers)
        await client.wait_count(n + 2)
        assert set(answers_after(client, t_back)) == {base_answer}
        assert (await health(url))["adapters"] == []
    finally:
        await client.stop()
        stop.set()
        await asyncio.wait_for(task, 60)
    assert client.failed() == [], client.failed()[:3]
    # The answers moved base -> adapter -> base, and only around the two events.
    contents = [a.content for a in client.answers]
    assert contents[0] == base_answer and contents[-1] == base_answer and good_answer in contents
    print(json.dumps({"requests": len(client.answers), "promoted_to_deployed_s": round(t_done - t_pub, 2),
                      "timings": deployed["timings"]}))


async def test_bad_adapters_are_refused_and_the_serving_one_stays(
        make_settings: Any, smollm2_gguf: Path, llama_python: Path, follower_adapters: dict[str, Any],
        nc: Any) -> None:
    settings = follower_settings(make_settings, smollm2_gguf, llama_python)
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    follower, stop, task = await start_follower(settings)
    url = follower.target.url
    good_answer = follower_adapters["answers"]["good"][0]
    client = ChatClient(url, follower_adapters["probe"][0]["messages"][0]["content"])
    try:
        good = install_version(settings.data_dir, "v1", Path(follower_adapters["good"]))
        await publish_event(js, "model.promoted", good)
        assert (await outcomes.wait(good["event_id"]))[0] == "model.deployed"
        client.start()
        await client.wait_count(1)

        cases = {
            "sha256_mismatch": install_version(settings.data_dir, "v2", Path(follower_adapters["good"]),
                                               adapter_sha256="0" * 64),
            "base_mismatch": install_version(settings.data_dir, "v3", Path(follower_adapters["other_base"])),
            "probe_failed": install_version(settings.data_dir, "v4", Path(follower_adapters["scrambled"])),
        }
        for reason, event in cases.items():
            await publish_event(js, "model.promoted", event)
            subject, failed = await outcomes.wait(event["event_id"])
            assert subject == "model.deploy_failed", failed
            ModelDeployFailed.model_validate(failed)
            assert failed["reason"] == reason, failed
            assert failed["serving"] == "v1" and failed["previous"] == "v1"
            h = await health(url)
            assert h["active"] == "v1" and [a["id"] for a in h["adapters"]] == ["v1"], h
            n = len(client.answers)
            await client.wait_count(n + 1)
            assert client.answers[-1].content == good_answer
            if reason == "base_mismatch":  # the message names both bases
                assert "Qwen2.5 0.5B Instruct" in failed["detail"] and h["base"]["sha256"] in failed["detail"]
            if reason == "probe_failed":
                assert failed["agreement"] is not None and failed["agreement"] < settings.follower.min_agreement
                assert [p["answer"] for p in failed["probe"]] == follower_adapters["answers"]["scrambled"]
        # The OpenAI shapes a client also uses: the model list and a streamed answer (from the active version).
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/models") as r:
                ids = [m["id"] for m in (await r.json())["data"]]
            assert ids == ["academy", "base", "v1"]
            async with s.post(f"{url}/v1/chat/completions", json={
                    "model": "academy", "stream": True, "max_tokens": 24, "temperature": 0.0,
                    "messages": follower_adapters["probe"][0]["messages"]}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                lines = [ln for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == good_answer
        assert {c["model"] for c in chunks} == {"v1"}
    finally:
        await client.stop()
        stop.set()
        await asyncio.wait_for(task, 60)
    assert client.failed() == []
    assert {a.content for a in client.answers} == {good_answer}
