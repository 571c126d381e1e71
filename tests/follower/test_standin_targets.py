"""The follower's `ollama` target against a real nats-server and an HTTP stand-in (the `venom` target's
tests are tests/follower/test_venom.py, against a stand-in of Venom as it really is).

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
