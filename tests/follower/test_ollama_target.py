"""The `ollama` target against an Ollama stand-in that holds to Ollama's API and to its 0.34.1 change
(tests/fixtures/ollama.py): before 0.34.1 a version is an adapter model; from 0.34.1 on, which refuses
`adapters`, the LoRA merged into the base GGUF (academyd.arena.merge_gguf, run as the follower runs it, in a
child interpreter) and a model created FROM that file; the alias moves only after the probe; what serves
is read back from Ollama. Small GGUFs written here (the real SmolLM2 merge: test_ollama_merged.py)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from fixtures.ollama import ADAPTERS_REFUSED, start_ollama_api, stop_ollama_api

from academyd.arena.merge_gguf import KEY_ADAPTER_SHA256, merged_file_name
from academyd.follower.targets import OllamaTarget, TargetError
from academyd.follower.verify import gguf_keys
from academyd.ollama import OllamaError, creates_adapters, ollama_create
from academyd.settings import Settings

BASE = "tiny:base"


def _base(path: Path) -> None:
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    q = gguf.GGMLQuantizationType.Q4_1
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), q),
                 raw_dtype=q)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _adapter(path: Path, base_sha256: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    w.add_string("academy.base_model.sha256", base_sha256)
    w.add_tensor("blk.0.attn_q.weight.lora_a", rng.standard_normal((4, 64)).astype(np.float32) * 0.1)
    w.add_tensor("blk.0.attn_q.weight.lora_b", rng.standard_normal((64, 4)).astype(np.float32) * 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Any]:
    base = tmp_path / "base.gguf"
    _base(base)
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    data = tmp_path / "data"
    versions = {}
    for i, v in enumerate(("v1", "v2")):
        vdir = data / "models" / v
        (vdir / "adapter").mkdir(parents=True)
        _adapter(vdir / "adapter.gguf", sha, seed=i)
        (vdir / "Modelfile").write_text(f'FROM {BASE}\nADAPTER ./adapter.gguf\nTEMPLATE """{{{{ .Prompt }}}}"""\n'
                                        'PARAMETER stop "<|im_end|>"\n')
        versions[v] = {"gguf_path": str(vdir / "adapter.gguf"), "adapter_path": str(vdir / "adapter"),
                       "modelfile_path": str(vdir / "Modelfile"),
                       "gguf_sha256": hashlib.sha256((vdir / "adapter.gguf").read_bytes()).hexdigest()}
    return {"base": base, "data": data, "versions": versions}


def _settings(setup: dict[str, Any], url: str, **follower: Any) -> Settings:
    # The merge needs gguf and numpy only: the test's interpreter stands for the trainer's.
    return Settings(data_dir=setup["data"], training={"trainer_python": sys.executable},
                    follower={"target": "ollama", "ollama_url": url, "ollama_base": BASE, "base_gguf": setup["base"],
                              **follower})


def test_the_version_boundary_is_0_34_1() -> None:
    table = {"0.33.9": True, "0.34.0": True, "0.34.1": False, "0.34.1-rc1": False, "0.35.0": False,
             "1.0.0": False, "v0.5.7": True, "dev": False}
    assert {v: creates_adapters(v) for v in table} == table


@pytest.mark.parametrize("version", ["0.34.0", "0.34.1", "0.40.2"])
async def test_adapter_model_before_0_34_1_and_merged_model_from_it(setup: dict[str, Any], version: str) -> None:
    api, runner = await start_ollama_api(version=version, base_name=BASE, base_gguf=setup["base"])
    target = OllamaTarget(_settings(setup, api.url))
    try:
        await target.start()
        merged = not creates_adapters(version)
        assert target.merged is merged and version in target.runtime
        assert await target.serving() is None
        staged = await target.stage("v1", setup["versions"]["v1"])
        tag = api.model("venom-adapter-v1")
        assert tag is not None and staged["created"] is True
        if merged:
            # One model file, made of the base and this adapter; no adapter layer.
            mfile = setup["data"] / "models" / "v1" / merged_file_name("q8_0")
            assert staged["merged_gguf"] == str(mfile) and tag["model_blob"].endswith(
                hashlib.sha256(mfile.read_bytes()).hexdigest())
            assert not tag.get("adapter_blobs")
            assert gguf_keys(Path(tag["model_blob"]))[KEY_ADAPTER_SHA256] == setup["versions"]["v1"]["gguf_sha256"]
        else:
            assert tag["model_blob"] == str(setup["base"]) and len(tag["adapter_blobs"]) == 1
        assert tag["template"] == "{{ .Prompt }}" and tag["parameters"]["stop"] == ["<|im_end|>"]
        # Staged, not served: the alias does not exist until the switch (after the probe).
        assert api.model("venom-academy") is None
        assert (await target.stage("v1", setup["versions"]["v1"]))["created"] is False  # immutable, made once
        await target.switch("v1", None)
        assert api.model("venom-academy")["digest"] == tag["digest"]

        again = OllamaTarget(_settings(setup, api.url))  # a restarted follower reads it back from Ollama
        await again.start()
        assert await again.serving() == "v1"
        await again.close()

        await target.stage("v2", setup["versions"]["v2"])
        await target.switch("v2", None)
        await target.discard("v1")
        assert (api.model("venom-adapter-v1") is None) is merged  # a merged tag is a whole model: freed
        await target.switch(None, None)
        assert api.model("venom-academy")["digest"] == api.model(BASE)["digest"]
        again = OllamaTarget(_settings(setup, api.url))
        await again.start()
        assert await again.serving() is None
        await again.close()
    finally:
        await target.close()
        await stop_ollama_api(api, runner)


async def test_from_0_34_1_the_stand_in_refuses_adapters_as_ollama_does(setup: dict[str, Any]) -> None:
    api, runner = await start_ollama_api(version="0.34.1", base_name=BASE, base_gguf=setup["base"])
    try:
        settings = _settings(setup, api.url).model_copy()
        settings = settings.model_copy(update={"arena": settings.arena.model_copy(update={"ollama_url": api.url})})
        files = setup["versions"]["v1"]
        with pytest.raises(OllamaError, match=ADAPTERS_REFUSED):  # the daemon's own adapter path
            await ollama_create(settings, {"version": "v1", "adapter_path": files["adapter_path"]},
                                {"gguf_path": files["gguf_path"], "from": BASE, "parameters": {}})
        assert api.model("venom-adapter-v1") is None
        pinned = OllamaTarget(_settings(setup, api.url, ollama_serve="adapter"))
        with pytest.raises(TargetError, match="set it to auto or merged"):
            await pinned.start()
        await pinned.close()
        # A merged model from an adapter of another base is refused before Ollama is asked.
        other = setup["data"] / "other.gguf"
        _adapter(other, "ab" * 32, seed=9)
        target = OllamaTarget(_settings(setup, api.url))
        await target.start()
        from academyd.follower.verify import Refused

        creates = len([r for r in api.requests if r.startswith("create")])
        with pytest.raises(Refused) as refused:
            await target.stage("v2", {**files, "gguf_path": str(other), "gguf_sha256": None})
        assert refused.value.reason == "load_failed" and "not on" in refused.value.detail
        assert len([r for r in api.requests if r.startswith("create")]) == creates
        await target.close()
    finally:
        await stop_ollama_api(api, runner)


def test_the_stand_in_reports_what_it_holds(setup: dict[str, Any]) -> None:
    # /api/tags names carry ":latest" and the alias shares its source's digest (what serving() relies on).
    import asyncio

    async def go() -> dict[str, Any]:
        api, runner = await start_ollama_api(version="0.34.1", base_name=BASE, base_gguf=setup["base"])
        try:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                await s.post(f"{api.url}/api/copy", json={"source": BASE, "destination": "venom-academy"})
                async with s.get(f"{api.url}/api/tags") as r:
                    tags = await r.json()
                async with s.delete(f"{api.url}/api/delete", json={"model": "nope"}) as r:
                    missing = r.status
                async with s.post(f"{api.url}/api/create", json={"model": "x", "files": {
                        "a.gguf": "sha256:" + setup["versions"]["v1"]["gguf_sha256"]}}) as r:
                    not_uploaded = (r.status, await r.json())
            return {"tags": tags, "missing": missing, "not_uploaded": not_uploaded}
        finally:
            await stop_ollama_api(api, runner)

    got = asyncio.run(go())
    names = {m["name"]: m["digest"] for m in got["tags"]["models"]}
    assert names["venom-academy:latest"] == names[BASE]
    assert got["missing"] == 404 and got["not_uploaded"][0] == 400, json.dumps(got)


async def test_the_merged_file_the_arena_judged_is_the_one_served(setup: dict[str, Any]) -> None:
    from academyd.arena.merge_gguf import merge

    files = setup["versions"]["v1"]
    judged = setup["data"] / "models" / "v1" / "arena" / merged_file_name("q8_0")
    merge(setup["base"], Path(files["gguf_path"]), judged)
    api, runner = await start_ollama_api(version="0.34.1", base_name=BASE, base_gguf=setup["base"])
    target = OllamaTarget(_settings(setup, api.url))
    try:
        await target.start()
        staged = await target.stage("v1", files)
        assert staged["merge"] == {"reused": str(judged)}
        assert api.model("venom-adapter-v1")["model_blob"].endswith(hashlib.sha256(judged.read_bytes()).hexdigest())
    finally:
        await target.close()
        await stop_ollama_api(api, runner)
