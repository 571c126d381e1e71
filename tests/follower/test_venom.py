"""The `venom` target against Venom as it really is (tests/fixtures/venom.py keeps every rule of
../shared/venom/academy-api.md), on a real nats-server: promote, promote, roll back, back to the base, each
converging with the probe asked of the `chat_model` Venom's reply names; every observed refusal ends as
`model.deploy_failed` with Venom's reason code while the runtime keeps what it served."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fixtures.follower import BASE_SAYS, QUESTION, Outcomes, make_version, publish_event, rolled_back
from fixtures.venom import BASE_MODEL_ID, VenomStandIn, venom_settings
from pydantic import ValidationError

from academyd.follower import Follower
from academyd.registry import adapter_sha256
from academyd.settings import Settings
from schemas.models import ModelDeployed, ModelDeployFailed

ANSWERS = {"v1": "Ziggy the octopus.", "v2": "Ziggy, the purple octopus.", "v3": "Ziggy the octopus, again."}


def gguf_sha(payload: dict[str, Any]) -> str:
    return hashlib.sha256(Path(payload["gguf_path"]).read_bytes()).hexdigest()


def versions(settings: Settings, smollm2_gguf: Path, base_identity: dict[str, str], venom: VenomStandIn,
             names: tuple[str, ...] = ("v1", "v2")) -> dict[str, dict[str, Any]]:
    """Versions as the registry lays them out, and what the runtime answers with each one's GGUF."""
    out = {}
    for gen, name in enumerate(names, start=1):
        p = make_version(settings.data_dir, name, smollm2_gguf, base_identity, ANSWERS[name], seed=gen)
        p["generation"] = gen
        venom.runtime.answers_by_gguf[gguf_sha(p)] = {QUESTION: ANSWERS[name]}
        out[name] = p
    venom.runtime.models[BASE_MODEL_ID] = {QUESTION: BASE_SAYS}
    return out


def with_generation(payload: dict[str, Any], generation: int, suffix: str) -> dict[str, Any]:
    return {**payload, "generation": generation, "event_id": f"{payload['event_id']}-{suffix}"}


async def running(settings: Settings) -> tuple[Follower, asyncio.Event, asyncio.Task[None]]:
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 30)
    return follower, stop, task


async def test_promote_promote_rollback_and_back_to_the_base_each_converges(
        make_settings: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn, nc: Any) -> None:
    smollm2_gguf, base_identity = served_base
    settings = make_settings(follower=venom_settings(venom, base_gguf=smollm2_gguf))
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    vs = versions(settings, smollm2_gguf, base_identity, venom)
    v1, v2 = vs["v1"], vs["v2"]
    sha_before = adapter_sha256(Path(v1["adapter_path"]))
    follower, stop, task = await running(settings)
    try:
        async def step(subject: str, event: dict[str, Any], serving: str | None, chat: str) -> dict[str, Any]:
            asked = len(venom.runtime.asked)
            await publish_event(js, subject, event)
            got, payload = await outcomes.wait(event["event_id"], timeout=30)
            assert got == "model.deployed", payload
            ModelDeployed.model_validate(payload)
            assert payload["serving"] == serving and payload["generation"] == event["generation"], payload
            assert payload["agreement"] == 1.0, payload["probe"]
            assert venom.chat_model == chat and venom.active == serving
            # the probe asked the runtime for the model Venom chats with, after the switch
            assert venom.runtime.asked[asked:] == [(chat, QUESTION)]
            return payload

        await step("model.promoted", v1, "v1", "venom-adapter-v1")
        vdir = settings.models_dir / "v1"
        meta = json.loads((vdir / "metadata.json").read_text())
        assert meta["metadata_version"] == 2 and meta["base_model"] == meta["effective_base_model"] == BASE_MODEL_ID
        assert (vdir / "adapter" / "adapter.gguf").read_bytes() == (vdir / "adapter.gguf").read_bytes()
        assert adapter_sha256(vdir / "adapter") == sha_before == v1["adapter_sha256"]  # one meaning, installed or not
        activate = next(c for c in venom.calls if c["route"] == "activate")["body"]
        assert activate["runtime_id"] == "ollama" and activate["model_id"] == BASE_MODEL_ID
        assert activate["deploy_to_chat_runtime"] is True

        await step("model.promoted", v2, "v2", "venom-adapter-v2")
        # The rollback to v1 is one move: model.rolled_back and v1's model.promoted, one generation.
        rb = {**rolled_back("v2", "v1"), "generation": 3}
        await publish_event(js, "model.rolled_back", rb)
        await publish_event(js, "model.promoted", with_generation(v1, 3, "restored"))
        got, back = await outcomes.wait(rb["event_id"], timeout=30)
        assert got == "model.deployed" and back["serving"] == "v1" and back["generation"] == 3, back
        assert venom.chat_model == "venom-adapter-v1" and venom.active == "v1"

        # v2's promotion delivered again, with its older generation, after the rollback: nothing changes.
        calls = len(venom.calls)
        stale = with_generation(v2, 2, "late")
        await publish_event(js, "model.promoted", stale)
        to_base = {**rolled_back("v1", None), "generation": 4}
        await publish_event(js, "model.rolled_back", to_base)
        got, base = await outcomes.wait(to_base["event_id"], timeout=30)
        assert got == "model.deployed" and base["serving"] is None and base["generation"] == 4, base
        assert base["probe"][0]["answer"] == BASE_SAYS and venom.runtime.asked[-1] == (BASE_MODEL_ID, QUESTION)
        assert [c["route"] for c in venom.calls[calls:]] == ["deactivate"]  # no v2 in between
        assert venom.chat_model == BASE_MODEL_ID and venom.active is None  # the base, not one step back
        assert stale["event_id"] not in {p["source_event_id"] for _, p in outcomes.items}
        assert venom.activations() == ["v1", "v2", "v1"]
        deployed = [p["generation"] for s, p in outcomes.items if s == "model.deployed"]
        assert deployed == [1, 2, 3, 4]  # one model.deployed per generation reached
        status = follower.status()
        assert status["converged"] and status["diverged"] is None and status["served_generation"] == 4
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _bad_metadata_dir(tmp_path: Path, settings: Settings, venom: VenomStandIn) -> None:
    # Venom's ACADEMY_MODELS_DIR is not the Academy's: it holds an older copy of v1 with old metadata.
    other = tmp_path / "venom-models"
    shutil.copytree(settings.models_dir / "v1" / "adapter", other / "v1" / "adapter")
    (other / "v1" / "metadata.json").write_text(json.dumps({"base_model": "smollm2:135m", "version": "v1"}))
    venom.models_dir = other


REFUSALS = [
    # (case, follower overrides, what to do to Venom or the version, Venom's reason_code, reason)
    ("metadata", {}, "models_dir", "ADAPTER_METADATA_INCOMPLETE", "runtime_refused"),
    ("base mismatch", {"venom_base_models": {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                             "smollm2-135m-instruct": BASE_MODEL_ID}},
     None, "ADAPTER_BASE_MODEL_MISMATCH", "runtime_refused"),
    ("GGUF placement", {}, "no_gguf", "ADAPTER_ACTIVATION_FAILED", "runtime_refused"),
    ("nothing to deactivate", {}, "deactivated_by_hand", "NO_ACTIVE_ADAPTER", "runtime_refused"),
    ("one step back is not the base", {}, "previous_is_v2", None, "base_unreachable"),
]


@pytest.mark.parametrize(("case", "overrides", "setup", "code", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_each_refusal_venom_makes_is_a_deploy_failed_with_its_code(
        case: str, overrides: dict[str, Any], setup: str | None, code: str | None, reason: str, tmp_path: Path,
        make_settings: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn, nc: Any) -> None:
    smollm2_gguf, base_identity = served_base
    settings = make_settings(follower=venom_settings(venom, base_gguf=smollm2_gguf, **overrides))
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    vs = versions(settings, smollm2_gguf, base_identity, venom)
    v2 = vs["v2"]
    event: dict[str, Any] = {**v2, "generation": 5}
    subject = "model.promoted"
    serving_before: str | None = None
    if setup == "models_dir":
        _bad_metadata_dir(tmp_path, settings, venom)
    elif setup == "no_gguf":  # the GGUF export failed: the version has only the safetensors adapter
        Path(v2["gguf_path"]).unlink()
        event = {**event, "gguf_path": None, "base_sha256": base_identity["base_sha256"]}
    elif setup in ("deactivated_by_hand", "previous_is_v2"):
        # Venom served v1, then v2, then someone deactivated v2 in Venom's UI: chat went one step back, to v1.
        venom.runtime.create("venom-adapter-v1", Path(vs["v1"]["gguf_path"]))
        venom.runtime.create("venom-adapter-v2", Path(v2["gguf_path"]))
        if setup == "deactivated_by_hand":
            venom.active, venom.chat_model, venom.previous = None, "venom-adapter-v1", "venom-adapter-v1"
        else:  # v2, v1 active again: its step back is v2
            venom.active, venom.chat_model, venom.previous = "v1", "venom-adapter-v1", "venom-adapter-v2"
        serving_before = "v1"
        subject, event = "model.rolled_back", {**rolled_back("v1", None), "generation": 5}
    follower, stop, task = await running(settings)
    try:
        await publish_event(js, subject, event)
        got, failed = await outcomes.wait(event["event_id"], timeout=30)
        assert got == "model.deploy_failed", failed
        ModelDeployFailed.model_validate(failed)
        assert failed["reason"] == reason and failed["reason_code"] == code, failed
        assert failed["generation"] == 5
        assert failed["serving"] == (serving_before if setup != "previous_is_v2" else "v2")  # where chat is now
        # the runtime keeps what it served, and chat stays where it was or says exactly where it is
        if subject == "model.promoted":
            assert venom.active is None and venom.chat_model == BASE_MODEL_ID
        else:
            assert "chat is on venom-adapter-" in failed["detail"], failed["detail"]
        status = follower.status()
        assert status["diverged"] is not None and (code or reason) in status["diverged"]
        assert not status["converged"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_settings_refuse_a_venom_target_without_runtime_model_or_base_name(tmp_path: Path) -> None:
    ok = {"target": "venom", "venom_url": "http://127.0.0.1:8000", "venom_runtime_id": "ollama",
          "venom_model_id": BASE_MODEL_ID, "venom_chat_url": "http://127.0.0.1:11434/v1/chat/completions",
          "venom_base_models": {"smollm2-135m-instruct": BASE_MODEL_ID}}
    Settings(data_dir=tmp_path, follower=ok)
    for missing in ("venom_runtime_id", "venom_model_id", "venom_base_models"):
        with pytest.raises(ValidationError, match=f"follower.{missing}"):
            Settings(data_dir=tmp_path, follower={k: v for k, v in ok.items() if k != missing})
    with pytest.raises(ValidationError, match="names no Venom model for training.base_model"):
        Settings(data_dir=tmp_path, follower={**ok, "venom_base_models": {"Qwen2.5-0.5B": "qwen2.5:0.5b"}})


async def test_the_stand_in_refuses_a_deploy_without_runtime_or_model_as_venom_does(venom: VenomStandIn) -> None:
    """The follower cannot send these (its settings refuse to load); the stand-in still enforces them."""
    async with aiohttp.ClientSession() as http:
        url = venom.url + "/api/v1/academy/adapters/activate"
        for body, status, code in [
            ({"adapter_id": "v1", "adapter_path": "x", "deploy_to_chat_runtime": True}, 400, "ADAPTER_RUNTIME_REQUIRED"),
            ({"adapter_id": "v1", "adapter_path": "x", "deploy_to_chat_runtime": True, "runtime_id": "ollama"},
             400, "ADAPTER_RUNTIME_MODEL_REQUIRED"),
            ({"adapter_id": "v1", "deploy_to_chat_runtime": True}, 422, None),  # adapter_path: required, never read
            ({"adapter_id": "v1", "adapter_path": "x", "deploy_to_chat_runtime": "yes"}, 422, None),
        ]:
            async with http.post(url, json=body) as resp:
                answer = await resp.json()
                assert resp.status == status, answer
                if code:
                    assert answer["detail"]["reason_code"] == code
        async with http.post(venom.url + "/api/v1/academy/adapters/deactivate") as resp:
            assert resp.status == 200 and (await resp.json()) == {"success": False,
                                                                  "message": "No active adapter to deactivate"}


async def test_the_stand_in_keeps_venoms_observed_rules(
        tmp_path: Path, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn) -> None:
    """academy-api.md, rule by rule, straight over HTTP: what the follower relies on and works around."""
    smollm2_gguf, base_identity = served_base
    data = tmp_path / "data"
    for seed, name in enumerate(("v1", "v2"), start=1):
        p = make_version(data, name, smollm2_gguf, base_identity, "x", seed=seed)
        shutil.copy(p["gguf_path"], Path(p["adapter_path"]) / "adapter.gguf")
        (data / "models" / name / "metadata.json").write_text(json.dumps({
            "metadata_version": 2, "source_flow": "academyd", "created_at": "2026-12-01T00:00:00Z",
            "base_model": BASE_MODEL_ID, "effective_base_model": BASE_MODEL_ID, "parameters": {}}))
    url = venom.url + "/api/v1/academy/adapters"

    def body(adapter_id: str, **kw: Any) -> dict[str, Any]:
        return {"adapter_id": adapter_id, "adapter_path": "/nowhere", "runtime_id": "ollama",
                "model_id": BASE_MODEL_ID, "deploy_to_chat_runtime": True, **kw}

    async with aiohttp.ClientSession() as http:
        async def post(path: str, payload: dict[str, Any] | None = None) -> tuple[int, Any]:
            async with http.post(url + path, json=payload) as r:
                return r.status, await r.json()

        assert (await post("/activate", body("../v1")))[0] == 400
        assert (await post("/activate", body("v1", runtime_id="openai")))[0] == 400  # local runtimes only
        assert (await post("/activate", body("v9")))[1]["detail"]["reason_code"] == "ADAPTER_METADATA_INCOMPLETE"
        (data / "models" / "v9").mkdir()
        shutil.copy(data / "models" / "v1" / "metadata.json", data / "models" / "v9" / "metadata.json")
        assert await post("/activate", body("v9")) == (404, {"detail": "Adapter not found"})
        # registry only: the version is active, chat keeps serving what it served
        status, answer = await post("/activate", body("v1", deploy_to_chat_runtime=False))
        assert status == 200 and answer["deployed"] is False and venom.active == "v1"
        assert venom.chat_model == BASE_MODEL_ID
        # deploys (adapter_path is never read); then the observed v1, v2, v1, deactivate -> chat on v2
        for name in ("v1", "v2", "v1"):
            status, answer = await post("/activate", body(name))
            assert status == 200 and answer["chat_model"] == f"venom-adapter-{name}", answer
        status, answer = await post("/deactivate")
        assert status == 200 and answer["success"] is True
        assert venom.active is None and venom.chat_model == "venom-adapter-v2"  # one step back, not the base
        async with http.get(url) as r:
            listed = {a["adapter_id"]: a for a in await r.json()}
        assert listed["v1"]["metadata_status"] == "canonical" and not any(a["is_active"] for a in listed.values())
        async with http.get(venom.url + "/api/v1/system/llm-runtime/active") as r:
            assert (await r.json())["active_model"] == "venom-adapter-v2"
        venom.remote_override = "192.0.2.7"  # not localhost
        assert (await post("/activate", body("v1")))[0] == 403
