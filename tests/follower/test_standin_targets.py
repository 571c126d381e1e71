"""The follower's `ollama` target against a real nats-server and the Ollama stand-in (the `venom` target's
tests are tests/follower/test_venom.py, against a stand-in of Venom as it really is).

No Ollama can run on these machines: tests/fixtures/ollama.py keeps Ollama's documented API and its 0.34.1
change (no new adapter models). Here its chat answers from a table, by what a model was made of (the
adapter blob, or the adapter a merged GGUF records): what a runtime with that adapter would say. The real
llama.cpp behind it, on the real SmolLM2 merge, is tests/follower/test_ollama_merged.py. The adapters are
real files: an adapter directory hashed like the registry does and a GGUF adapter naming the real SmolLM2
base file as its base; from 0.34.1 on each is merged into that base (academyd.arena.merge_gguf).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures.follower import BASE_SAYS, QUESTION, Outcomes, make_version, publish_event, rolled_back
from fixtures.ollama import start_ollama_api, stop_ollama_api

from academyd.arena.merge_gguf import KEY_ADAPTER_SHA256
from academyd.follower import Follower
from academyd.follower.verify import gguf_keys
from schemas.models import ModelDeployed, ModelDeployFailed

BASE = "smollm2:135m"


async def run_follower(settings: Any) -> tuple[Follower, asyncio.Event, asyncio.Task[None]]:
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 30)
    return follower, stop, task


def gguf_sha(payload: dict[str, Any]) -> str:
    from academyd.files import sha256_file

    return sha256_file(Path(payload["gguf_path"]))


def made_of(model: dict[str, Any]) -> str | None:
    """The adapter (GGUF sha256) a stand-in model serves: its adapter blob, or what its merged GGUF records."""
    if model.get("adapter_blobs"):
        return Path(model["adapter_blobs"][0]).name.removeprefix("sha256-")
    return gguf_keys(Path(model["model_blob"])).get(KEY_ADAPTER_SHA256)


@pytest.mark.parametrize("version", ["0.34.0", "0.34.1"])
async def test_ollama_target_creates_probes_and_selects_the_tag(
        make_settings: Any, smollm2_gguf: Path, base_identity: dict[str, str], nc: Any, version: str) -> None:
    answers: dict[str | None, str] = {None: BASE_SAYS}
    api, runner = await start_ollama_api(version=version, base_name=BASE, base_gguf=smollm2_gguf,
                                         answer=lambda m, msgs: answers.get(made_of(m), "?"))
    # The merge needs gguf and numpy only: the test's interpreter stands for the trainer's.
    settings = make_settings(follower={"target": "ollama", "ollama_url": api.url, "ollama_base": BASE,
                                       "base_gguf": smollm2_gguf}, training={"trainer_python": sys.executable})
    merged = version == "0.34.1"
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    v1 = make_version(settings.data_dir, "v1", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=1)
    v2 = make_version(settings.data_dir, "v2", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=2)
    answers[gguf_sha(v1)] = "Ziggy the octopus."
    answers[gguf_sha(v2)] = "Bananas bananas bananas."
    follower, stop, task = await run_follower(settings)
    try:
        await publish_event(js, "model.promoted", v1)
        subject, deployed = await outcomes.wait(v1["event_id"], timeout=60)
        assert subject == "model.deployed", deployed
        ModelDeployed.model_validate(deployed)
        assert deployed["serving"] == "v1" and deployed["agreement"] == 1.0
        assert deployed["checks"]["base"]["verified"] is True
        created = api.model("venom-adapter-v1")
        assert made_of(created) == gguf_sha(v1)
        if merged:  # one model file: SmolLM2 with v1 merged in, no adapter layer
            assert not created.get("adapter_blobs") and created["model_blob"] != str(smollm2_gguf)
        else:
            assert created["model_blob"] == str(smollm2_gguf) and len(created["adapter_blobs"]) == 1
        assert created["template"] == "{{ .Prompt }}" and created["parameters"]["stop"] == ["<|im_end|>"]
        assert api.model("venom-academy")["digest"] == created["digest"]

        # v2 is created but answers unlike the arena: the alias stays on v1 (a merged v2 is deleted again).
        await publish_event(js, "model.promoted", v2)
        subject, failed = await outcomes.wait(v2["event_id"], timeout=60)
        assert subject == "model.deploy_failed" and failed["reason"] == "probe_failed", failed
        ModelDeployFailed.model_validate(failed)
        assert failed["serving"] == "v1" and failed["probe"][0]["answer"] == "Bananas bananas bananas."
        assert api.model("venom-academy")["digest"] == created["digest"]
        assert (api.model("venom-adapter-v2") is None) is merged

        rb = rolled_back("v1", None)
        await publish_event(js, "model.rolled_back", rb)
        subject, back = await outcomes.wait(rb["event_id"], timeout=60)
        assert subject == "model.deployed" and back["serving"] is None and back["agreement"] == 1.0, back
        assert api.model("venom-academy")["digest"] == api.model(BASE)["digest"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await stop_ollama_api(api, runner)
