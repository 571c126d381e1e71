"""The merged path on the real model (#19): the real SmolLM2-135M-Instruct (Q4_1 GGUF) and a real LoRA trained
on it here (tests/fixtures/build_follower_adapters.py), an Ollama of 0.34.1 (the stand-in of
tests/fixtures/ollama.py, which refuses adapter models and answers chat with real llama.cpp on the model it
was given).

The `ollama` target merges the adapter into the base as Q8_0 (academyd.arena.merge_gguf in the trainer's
interpreter), creates `venom-adapter-v1` FROM that file, asks it the probe and moves the alias. The merged
file is then measured as the arena measures a served artifact (`academyd.arena.served.agreement_of`:
teacher-forced top-1 agreement with the trainer's greedy replies, transformers + peft): it must answer the
arena's probes like base + adapter in llama.cpp (>= arena.served_agreement_min, 0.85), while the base alone
does not.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fixtures.follower import install_version
from fixtures.ollama import start_ollama_api, stop_ollama_api
from fixtures.trainer import trainer_env

from academyd.follower.targets import OllamaTarget
from academyd.settings import ArenaSettings, Settings
from academyd.trainer.cpu import WAIT_ENV

pytestmark = pytest.mark.slow

THRESHOLD = ArenaSettings().served_agreement_min
MEASURE = r"""
import json, sys
from academyd.arena.runtime import read_probes
from academyd.arena.served import agreement_of
doc = read_probes(sys.argv[1])
out = {}
for name, (base, adapter) in json.loads(sys.argv[2]).items():
    r = agreement_of(doc, base, adapter, n_threads=2, with_text=False)
    out[name] = {k: r[k] for k in ("n", "agreement", "heldout_agreement", "general_agreement")}
print(json.dumps(out))
"""


async def test_the_merged_q8_0_model_is_created_and_answers_like_base_plus_adapter(
        tmp_path: Path, llama_python: Path, smollm2_gguf: Path, follower_adapters: dict[str, Any]) -> None:
    data = tmp_path / "data"
    payload = install_version(data, "v1", Path(follower_adapters["good"]))
    probe = follower_adapters["probe"][0]  # the house fact, and what base + adapter answer in llama.cpp
    api, runner = await start_ollama_api(version="0.34.1", base_name="smollm2:135m", base_gguf=smollm2_gguf,
                                         llama_python=llama_python)
    settings = Settings(data_dir=data, training={"trainer_python": llama_python}, follower={
        "target": "ollama", "ollama_url": api.url, "ollama_base": "smollm2:135m", "base_gguf": smollm2_gguf})
    target = OllamaTarget(settings)
    try:
        await target.start()
        assert target.merged
        staged = await target.stage("v1", {k: payload[k] for k in ("gguf_path", "adapter_path", "modelfile_path")})
        merged = Path(staged["merged_gguf"])
        info = staged["merge"]
        print(f"\nmerge of SmolLM2 + v1 as Q8_0: {info['merged']} tensors, {info['params_merged'] / 1e6:.1f} M "
              f"parameters, merge {info['merge_s']:.2f} s ({info['per_tensor_s'] * 1e3:.1f} ms per tensor), "
              f"total {info['total_s']:.2f} s; {merged.stat().st_size / 1e6:.0f} MB")
        assert api.model("venom-adapter-v1")["model_blob"].endswith(info["sha256"])
        assert not api.model("venom-adapter-v1").get("adapter_blobs")
        answer = await target.ask("v1", probe["messages"], probe["max_tokens"])
        print(f"merged in llama.cpp: {answer!r}\nbase + adapter:     {probe['expected']!r}\n"
              f"base:               {probe['base_expected']!r}")
        assert "Ziggy" in answer and "Ziggy" not in probe["base_expected"]
        await target.switch("v1", None)
        assert api.model("venom-academy")["digest"] == api.model("venom-adapter-v1")["digest"]
    finally:
        await target.close()
        await stop_ollama_api(api, runner)

    cases = {"merged Q8_0": (str(merged), None),
             "base + adapter": (str(smollm2_gguf), payload["gguf_path"]),
             "base": (str(smollm2_gguf), None)}
    proc = subprocess.run([str(llama_python), "-c", MEASURE, follower_adapters["probes"], json.dumps(cases)],
                          capture_output=True, text=True, env=trainer_env({"OMP_NUM_THREADS": "2", **WAIT_ENV}),
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in got.items():
        print(f"  {name:16s} agreement {r['agreement']:.3f} (held-out {r['heldout_agreement']:.3f}, "
              f"general {r['general_agreement']:.3f}, n {r['n']})")
    assert got["merged Q8_0"]["agreement"] >= THRESHOLD, got
    assert got["merged Q8_0"]["heldout_agreement"] >= THRESHOLD, got  # the adapter's own facts survived the merge
    assert abs(got["merged Q8_0"]["agreement"] - got["base + adapter"]["agreement"]) <= 0.05, got
    assert got["base"]["heldout_agreement"] < THRESHOLD, got  # what the adapter adds is measurable
