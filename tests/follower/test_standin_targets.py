"""The follower's `ollama` and `venom` targets against a real nats-server and HTTP stand-ins.

Neither Ollama nor Venom can run on these machines, so both are small aiohttp servers of ours
(tests/fixtures/follower.py) that keep the API contracts the follower uses and answer the probe from a
table (what a runtime with that adapter would say). The adapters are real files: an adapter directory
hashed like the registry does and a GGUF adapter naming the real SmolLM2 base file as its base.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from academyd.follower import Follower
from fixtures.follower import BASE_SAYS, QUESTION, Outcomes, make_version, publish_event, rolled_back
from schemas.models import ModelDeployed, ModelDeployFailed


async def run_follower(settings: Any) -> tuple[Follower, asyncio.Event, asyncio.Task[None]]:
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 30)
    return follower, stop, task


def gguf_digest(payload: dict[str, Any]) -> str:
    from academyd.files import sha256_file

    return "sha256:" + sha256_file(Path(payload["gguf_path"]))


async def test_ollama_target_creates_probes_and_selects_the_tag(
        make_settings: Any, smollm2_gguf: Path, base_identity: dict[str, str], ollama_standin: Any, nc: Any) -> None:
    settings = make_settings(follower={"target": "ollama", "ollama_url": ollama_standin.url,
                                       "ollama_base": "smollm2:135m", "base_gguf": smollm2_gguf})
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = make_version(settings.data_dir, "v1", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=1)
    v2 = make_version(settings.data_dir, "v2", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=2)
    ollama_standin.base_answers = {QUESTION: BASE_SAYS}
    ollama_standin.answers_by_blob[gguf_digest(v1)] = {QUESTION: "Ziggy the octopus."}
    ollama_standin.answers_by_blob[gguf_digest(v2)] = {QUESTION: "Bananas bananas bananas."}
    follower, stop, task = await run_follower(settings)
    try:
        await publish_event(js, "model.promoted", v1)
        subject, deployed = await outcomes.wait(v1["event_id"], timeout=30)
        assert subject == "model.deployed", deployed
        ModelDeployed.model_validate(deployed)
        assert deployed["serving"] == "v1" and deployed["agreement"] == 1.0
        assert deployed["checks"]["base"]["verified"] is True
        created = ollama_standin.models["venom-adapter-v1"]
        assert created["from"] == "smollm2:135m" and created["adapters"] == {"adapter.gguf": gguf_digest(v1)}
        assert created["template"] == "{{ .Prompt }}" and created["parameters"]["stop"] == ["<|im_end|>"]
        assert ollama_standin.models["venom-academy"] == {"copy_of": "venom-adapter-v1"}

        # v2 is created (a tag costs nothing) but answers unlike the arena: the alias stays on v1.
        await publish_event(js, "model.promoted", v2)
        subject, failed = await outcomes.wait(v2["event_id"], timeout=30)
        assert subject == "model.deploy_failed" and failed["reason"] == "probe_failed", failed
        ModelDeployFailed.model_validate(failed)
        assert failed["serving"] == "v1" and failed["probe"][0]["answer"] == "Bananas bananas bananas."
        assert ollama_standin.models["venom-academy"] == {"copy_of": "venom-adapter-v1"}

        rb = rolled_back("v1", None)
        await publish_event(js, "model.rolled_back", rb)
        subject, back = await outcomes.wait(rb["event_id"], timeout=30)
        assert subject == "model.deployed" and back["serving"] is None and back["agreement"] == 1.0, back
        assert ollama_standin.models["venom-academy"] == {"copy_of": "smollm2:135m"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_venom_target_activates_checks_and_deactivates(
        make_settings: Any, smollm2_gguf: Path, base_identity: dict[str, str], venom_standin: Any, nc: Any) -> None:
    settings = make_settings(follower={"target": "venom", "venom_url": venom_standin.url, "base_gguf": smollm2_gguf,
                                       "venom_chat_url": venom_standin.url + "/v1/chat/completions"})
    assert venom_standin.models_dir == settings.models_dir
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = make_version(settings.data_dir, "v1", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=1)
    v2 = make_version(settings.data_dir, "v2", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=2)
    other = make_version(settings.data_dir, "v3", smollm2_gguf,
                         {"base_name": "Qwen2.5 0.5B Instruct", "base_sha256": "ab" * 32}, "x", seed=3)
    venom_standin.answers_by_id = {None: {QUESTION: BASE_SAYS}, "v1": {QUESTION: "Ziggy the octopus."},
                                   "v2": {QUESTION: "Bananas."}}
    follower, stop, task = await run_follower(settings)
    try:
        await publish_event(js, "model.promoted", v1)
        subject, deployed = await outcomes.wait(v1["event_id"], timeout=30)
        assert subject == "model.deployed" and deployed["serving"] == "v1", deployed
        assert venom_standin.active == "v1"
        assert venom_standin.calls[-1]["activate"]["adapter_path"] == v1["adapter_path"]

        # Venom can only be asked after activation: a failed probe activates the previous version again.
        await publish_event(js, "model.promoted", v2)
        subject, failed = await outcomes.wait(v2["event_id"], timeout=30)
        assert subject == "model.deploy_failed" and failed["reason"] == "probe_failed", failed
        assert venom_standin.active == "v1" and failed["serving"] == "v1"

        # Another base: refused before Venom is called at all.
        calls = len(venom_standin.calls)
        await publish_event(js, "model.promoted", other)
        subject, refused = await outcomes.wait(other["event_id"], timeout=30)
        assert subject == "model.deploy_failed" and refused["reason"] == "base_mismatch", refused
        assert "Qwen2.5 0.5B Instruct" in refused["detail"] and base_identity["base_sha256"] in refused["detail"]
        assert len(venom_standin.calls) == calls

        rb = rolled_back("v1", None)
        await publish_event(js, "model.rolled_back", rb)
        subject, back = await outcomes.wait(rb["event_id"], timeout=30)
        assert subject == "model.deployed" and back["serving"] is None, back
        assert venom_standin.active is None and venom_standin.calls[-1] == {"deactivate": True}
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_restarted_follower_applies_what_it_missed_and_nothing_twice(
        make_settings: Any, smollm2_gguf: Path, base_identity: dict[str, str], venom_standin: Any, nc: Any) -> None:
    settings = make_settings(follower={"target": "venom", "venom_url": venom_standin.url, "base_gguf": smollm2_gguf,
                                       "venom_chat_url": venom_standin.url + "/v1/chat/completions"})
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = make_version(settings.data_dir, "v1", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=1)
    v2 = make_version(settings.data_dir, "v2", smollm2_gguf, base_identity, "Ziggy, purple.", seed=2)
    venom_standin.answers_by_id = {None: {QUESTION: BASE_SAYS}, "v1": {QUESTION: "Ziggy the octopus."},
                                   "v2": {QUESTION: "Ziggy, purple."}}
    follower, stop, task = await run_follower(settings)
    await publish_event(js, "model.promoted", v1)
    assert (await outcomes.wait(v1["event_id"], timeout=30))[0] == "model.deployed"
    stop.set()
    await asyncio.wait_for(task, 30)

    # While the follower is down: v2 is promoted, and v1's promotion is published again (another msg id).
    await publish_event(js, "model.promoted", v2)
    await publish_event(js, "model.promoted", v1, msg_id=v1["event_id"] + "-again")
    activations = [c for c in venom_standin.calls if "activate" in c]
    assert len(activations) == 1
    follower, stop, task = await run_follower(settings)
    try:
        subject, deployed = await outcomes.wait(v2["event_id"], timeout=30)
        assert subject == "model.deployed" and deployed["serving"] == "v2" and deployed["previous"] == "v1"
        for _ in range(200):
            if sum(p["source_event_id"] == v1["event_id"] for _, p in outcomes.items) >= 2:
                break
            await asyncio.sleep(0.05)
        replies = [p for _, p in outcomes.items if p["source_event_id"] == v1["event_id"]]
        assert len(replies) == 2 and replies[0]["event_id"] == replies[1]["event_id"]  # the recorded outcome
        # v1 was activated once, v2 once: the old promotion replayed swapped nothing back.
        assert [c["activate"]["adapter_id"] for c in venom_standin.calls if "activate" in c] == ["v1", "v2"]
        assert venom_standin.active == "v2"
        assert await follower.feed.pending() == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
