"""Pure pieces of the follower: the GGUF header reader, the base-identity rule, probe matching, Modelfile parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from academyd.follower.follower import _matches, load_probe
from academyd.follower.targets import modelfile_parts
from academyd.follower.verify import Refused, check_base, gguf_keys

BASE = {"sha256": "aa" * 32, "meta": {"general.name": "SmolLM2 135M"}}


def test_gguf_header_reader_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 16.0)
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.name", "SmolLM2 135M ✅")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("some.floats", [1.0, 2.0])
    w.add_bool("some.flag", True)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = gguf_keys(path)
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()
              if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value
    assert ours["general.base_model.0.name"] == "SmolLM2 135M ✅"


@pytest.mark.parametrize("data", [b"", b"GGUF", b"NOPE" + b"\0" * 20, b"GGUF\x09\0\0\0" + b"\0" * 16])
def test_gguf_header_reader_refuses_what_is_not_gguf(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(Refused) as exc:
        gguf_keys(path)
    assert exc.value.reason == "load_failed" and str(path) in exc.value.detail


@pytest.mark.parametrize(("keys", "require", "outcome"), [
    ({"general.base_model.0.sha256": "aa" * 32, "general.base_model.0.name": "x"}, False, True),
    ({"general.base_model.0.sha256": "AA" * 32}, True, True),
    ({"general.base_model.0.sha256": "bb" * 32, "general.base_model.0.name": "Qwen"}, False, "base_mismatch"),
    ({"general.base_model.0.name": "SmolLM2 135M"}, True, True),
    ({"general.base_model.0.name": "Qwen2.5"}, False, "base_mismatch"),
    ({}, False, False),
    ({}, True, "base_mismatch"),
    ({"adapter.type": "lora"}, False, False),
])
def test_base_identity_rule(keys: dict[str, Any], require: bool, outcome: Any) -> None:
    if isinstance(outcome, str):
        with pytest.raises(Refused) as exc:
            check_base(keys, BASE, require=require, adapter="a.gguf")
        assert exc.value.reason == outcome
        assert "a.gguf" in exc.value.detail and "SmolLM2 135M" in exc.value.detail  # both named
    else:
        assert check_base(keys, BASE, require=require, adapter="a.gguf")["verified"] is outcome


@pytest.mark.parametrize(("answer", "expected", "match"), [
    ("Paris.", "Paris.", True), (" Paris is the capital.", "Paris is", True), ("Paris", "Paris is the capital", True),
    ("Lyon", "Paris", False), ("", "Paris", False), ("", "", True), ("Paris", "", False),
])
def test_probe_matching_allows_different_token_limits(answer: str, expected: str, match: bool) -> None:
    assert _matches(answer, expected) is match


def test_probe_source_order(tmp_path: Path, make_settings: Any) -> None:
    settings = make_settings()
    vdir = tmp_path / "models" / "v1"
    (vdir / "adapter").mkdir(parents=True)
    event = {"adapter_path": str(vdir / "adapter")}
    assert load_probe(event, settings)[1] == "default"
    (vdir / "probe.json").write_text('[{"messages": [{"role": "user", "content": "q"}], "expected": "a"}]')
    items, source = load_probe(event, settings)
    assert source == str(vdir / "probe.json") and items[0]["expected"] == "a"
    assert load_probe({**event, "probe": [{"messages": []}]}, settings)[1] == "event"


def test_modelfile_parts() -> None:
    text = ('FROM smollm2:135m\nADAPTER /m/v1/adapter.gguf\nTEMPLATE """<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"""\n'
            'PARAMETER temperature 0.7\nPARAMETER num_ctx 4096\nPARAMETER stop "<|im_end|>"\nPARAMETER stop "</s>"\n')
    template, params = modelfile_parts(text)
    assert template == "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n"
    assert params == {"temperature": 0.7, "num_ctx": 4096, "stop": ["<|im_end|>", "</s>"]}


def test_arena_probes_file_is_read_with_its_gguf_sha256(tmp_path: Path, make_settings: Any) -> None:
    from academyd.follower.follower import announced_gguf_sha256

    vdir = tmp_path / "models" / "v2"
    (vdir / "adapter").mkdir(parents=True)
    (vdir / "arena").mkdir()
    doc = {"base_sha256": "aa" * 32, "adapter_gguf_sha256": "cc" * 32, "max_tokens": 32, "probes": [
        {"kind": "heldout", "messages": [{"role": "user", "content": "q"}], "trainer": "a", "runtime": "a b"}]}
    (vdir / "arena" / "probes.json").write_text(__import__("json").dumps(doc))
    event = {"adapter_path": str(vdir / "adapter"), "probes_path": str(vdir / "arena" / "probes.json")}
    items, source = load_probe(event, make_settings())
    assert source == event["probes_path"]
    assert items == [{"messages": [{"role": "user", "content": "q"}], "expected": "a b", "base_expected": None,
                      "max_tokens": 32}]
    assert announced_gguf_sha256(event) == "cc" * 32
    assert announced_gguf_sha256({**event, "gguf_sha256": "dd" * 32}) == "dd" * 32


def test_the_follower_base_defaults_to_the_academys_own(make_settings: Any, smollm2_gguf: Path, tmp_path: Path) -> None:
    """A follower beside a default install needs no base setting: it serves (and checks adapters against) the
    SmolLM2 GGUF the Academy trains on; an explicit follower.base_gguf wins; a base that is no GGUF gives none."""
    from academyd.follower.targets import base_gguf_of

    assert make_settings().follower.require_base_identity is True
    from academyd.basemodel import cached_sha256

    found = base_gguf_of(make_settings())  # the wheel's file, in this environment or the trainer's
    assert found is not None and found.name == smollm2_gguf.name and cached_sha256(found) == cached_sha256(smollm2_gguf)
    other = tmp_path / "other.gguf"
    assert base_gguf_of(make_settings(follower={"base_gguf": other})) == other
    model_dir = tmp_path / "hf-dir"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    assert base_gguf_of(make_settings(training={"base_model": str(model_dir)})) is None
