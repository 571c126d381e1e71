"""The LoRA merged into its base GGUF (academyd.arena.merge_gguf), on small GGUF files written here: the
merged weights are W + (alpha/r) B A within Q8_0's rounding, the rest of the base is copied byte for byte,
the file says what it was made of, and what must be refused is (another base, a 4-bit type).
The real SmolLM2 merge, served in llama.cpp, is tests/follower/test_ollama_merged.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from academyd.arena.merge_gguf import KEY_ADAPTER_SHA256, KEY_SCALE, KEY_TYPE, main, merge

Q = gguf.GGMLQuantizationType
RANK, ALPHA = 4, 16.0


def _write(path: Path, kind: str, tensors: dict[str, tuple[np.ndarray, Q]], keys: dict[str, str]) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if kind == "adapter":
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
    else:
        w.add_uint32("llama.block_count", 1)
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "<|im_end|>"])
    for k, v in keys.items():
        w.add_string(k, v)
    for name, (data, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, data.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, object]:
    rng = np.random.default_rng(7)
    base_w = {
        "blk.0.attn_q.weight": (rng.standard_normal((64, 96)).astype(np.float32) * 0.05, Q.Q4_1),
        "blk.0.ffn_down.weight": (rng.standard_normal((40, 48)).astype(np.float32) * 0.05, Q.F32),  # 48: no Q8_0
        "blk.0.attn_norm.weight": (np.ones(96, dtype=np.float32), Q.F32),
        "token_embd.weight": (rng.standard_normal((3, 96)).astype(np.float32), Q.Q8_0),
    }
    base = tmp_path / "base.gguf"
    _write(base, "model", base_w, {"general.name": "tiny"})
    lora = {}
    for name, (w, _) in base_w.items():
        if name.endswith(("attn_q.weight", "ffn_down.weight")):
            # deltas of about a quarter of Q4_1's step (0.013 here), four times Q8_0's (0.0008)
            lora[name] = (rng.standard_normal((RANK, w.shape[1])).astype(np.float32) * 0.02,
                          rng.standard_normal((w.shape[0], RANK)).astype(np.float32) * 0.02)
    adapter = tmp_path / "adapter.gguf"
    tensors = {}
    for name, (a, b) in lora.items():
        tensors[name + ".lora_a"] = (a, Q.F32)
        tensors[name + ".lora_b"] = (b, Q.F32)
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    _write(adapter, "adapter", tensors, {"academy.base_model.sha256": sha})
    return {"base": base, "adapter": adapter, "lora": lora, "base_w": base_w}


def _tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_merged_weights_are_the_base_plus_the_scaled_product_and_the_rest_is_copied(pair: dict, tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    info = merge(pair["base"], pair["adapter"], out)
    assert (info["merged"], info["tensors"], info["type"], info["scale"]) == (2, 4, "q8_0", ALPHA / RANK)
    base_t, got = _tensors(pair["base"]), _tensors(out)
    assert got["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert got["blk.0.ffn_down.weight"].tensor_type == Q.F16  # a row of 48 is no whole number of Q8_0 blocks
    for name in ("blk.0.attn_norm.weight", "token_embd.weight"):  # untouched: the base's bytes and type
        assert got[name].tensor_type == base_t[name].tensor_type
        assert np.asarray(got[name].data).tobytes() == np.asarray(base_t[name].data).tobytes()
    for name, (a, b) in pair["lora"].items():
        w = gguf.quants.dequantize(base_t[name].data, base_t[name].tensor_type)
        delta = (ALPHA / RANK) * (b @ a)
        merged = gguf.quants.dequantize(got[name].data, got[name].tensor_type)
        kept = 1 - np.abs(merged - (w + delta)).mean() / np.abs(delta).mean()
        assert kept > 0.85, (name, kept)  # the delta survives the storage type
    reader = gguf.GGUFReader(str(out))
    assert reader.fields[KEY_TYPE].contents() == "q8_0"
    assert reader.fields[KEY_SCALE].contents() == pytest.approx(ALPHA / RANK)
    assert reader.fields[KEY_ADAPTER_SHA256].contents() == hashlib.sha256(pair["adapter"].read_bytes()).hexdigest()
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "<|im_end|>"]
    assert reader.fields["general.name"].contents() == "tiny"
    assert not (tmp_path / "merged.gguf.part").exists()


def test_a_4_bit_merge_would_lose_the_delta_so_it_is_refused(pair: dict, tmp_path: Path, capsys) -> None:
    name = "blk.0.attn_q.weight"
    a, b = pair["lora"][name]
    w = gguf.quants.dequantize(_tensors(pair["base"])[name].data, Q.Q4_1)
    delta = (ALPHA / RANK) * (b @ a)
    q4 = gguf.quants.dequantize(gguf.quants.quantize(w + delta, Q.Q4_1), Q.Q4_1)
    kept_q4 = 1 - np.abs(q4 - (w + delta)).mean() / np.abs(delta).mean()
    assert kept_q4 < 0.5, kept_q4  # why the merge never writes a 4-bit type
    assert main([str(pair["base"]), str(pair["adapter"]), str(tmp_path / "m.gguf"), "--type", "f16"]) == 0
    with pytest.raises(SystemExit):
        main([str(pair["base"]), str(pair["adapter"]), str(tmp_path / "m.gguf"), "--type", "q4_1"])


def test_an_adapter_of_another_base_is_refused_naming_both(pair: dict, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.gguf"
    _write(other, "model", {"blk.0.attn_q.weight": (np.zeros((64, 96), np.float32), Q.F32)}, {"general.name": "x"})
    assert main([str(other), str(pair["adapter"]), str(tmp_path / "m.gguf")]) == 2
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["error"] == "bad_input" and "not on" in answer["reason"], answer
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("follower", "args"), [
    ({"target": "llamacpp"}, []),
    ({"target": "ollama", "ollama_url": "http://127.0.0.1:11434"}, ["--serve", "merged"]),
    ({"target": "ollama", "ollama_url": "http://127.0.0.1:11434", "ollama_serve": "merged"}, ["--serve", "merged"]),
    ({"target": "ollama", "ollama_url": "http://127.0.0.1:11434", "ollama_serve": "adapter"}, []),
])
def test_the_arena_measures_merged_models_where_the_follower_serves_them(tmp_path: Path, follower: dict,
                                                                         args: list[str]) -> None:
    from academyd.arena.contest import serve_args
    from academyd.settings import Settings

    assert serve_args(Settings(data_dir=tmp_path, follower=follower)) == args


def test_served_models_merges_the_candidate_where_the_follower_looks(pair: dict, tmp_path: Path) -> None:
    import argparse

    from academyd.arena.served import served_models

    ggufs = {"base": None, "candidate": str(pair["adapter"]), "champion": None}
    assert served_models(argparse.Namespace(serve="adapter"), str(pair["base"]), ggufs, tmp_path)["models"] == {}
    got = served_models(argparse.Namespace(serve="merged"), str(pair["base"]), ggufs, tmp_path)
    merged = tmp_path / "merged-q8_0.gguf"  # models/<vN>/arena/, where the ollama target reuses it
    assert got["models"] == {"candidate": (str(merged), None)}  # the runtime loads the merged model, no adapter
    reader = gguf.GGUFReader(str(merged))
    assert reader.fields[KEY_ADAPTER_SHA256].contents() == hashlib.sha256(pair["adapter"].read_bytes()).hexdigest()
    assert got["merged"]["candidate"]["sha256"] == hashlib.sha256(merged.read_bytes()).hexdigest()
