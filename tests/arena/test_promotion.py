"""Promotion and rollback: real adapters, real SQLite, real GGUF writing, a real HTTP server as Ollama."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fixtures.arena import FakeOllama, outbox_rows
from fixtures.trainer import trainer_env

from academyd.active_adapter import sync_active_adapter
from academyd.champion.errors import PromotionRefused
from academyd.champion.moves import promote, rollback
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store
from schemas.models import ModelPromoted, ModelRolledBack

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def register(settings: Settings, store: Store, run: Path, base: Path, run_id: str) -> dict:
    return Registry(store, settings).add_candidate(
        run_id=run_id, adapter_src=run / "adapter", run_summary=json.loads((run / "summary.json").read_text()),
        dataset=None, base_model=str(base), now=NOW)


@pytest.fixture
def no_gguf(arena_settings: Settings) -> Settings:
    arena_settings.arena.gguf = False
    return arena_settings


async def test_promote_writes_modelfile_gguf_active_adapter_and_event(
    arena_settings: Settings, arena_store: Store, trained_good: Path, tiny_base_model: Path, trainer_python: Path
) -> None:
    register(arena_settings, arena_store, trained_good, tiny_base_model, "run-1")
    payload = await promote(arena_store, arena_settings, "v1", reason="better on held-out data", now=NOW)

    reg = Registry(arena_store, arena_settings)
    v1 = reg.get("v1")
    assert v1["status"] == "champion" and v1["is_champion"] and reg.champion()["version"] == "v1"
    vdir = arena_settings.models_dir / "v1"
    modelfile = (vdir / "Modelfile").read_text().splitlines()
    assert f"FROM {tiny_base_model}" in modelfile
    assert f"ADAPTER {vdir / 'adapter.gguf'}" in modelfile
    template = next(line for line in modelfile if line.startswith("TEMPLATE"))
    assert "<|im_start|>{{ .Role }}" in template  # the tiny tokenizer's ChatML, in Ollama's Go template
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "PARAMETER temperature 0.7" in modelfile

    rows = outbox_rows(arena_store, "model.promoted")
    assert len(rows) == 1 and rows[0]["payload"] == payload and rows[0]["msg_id"] == payload["event_id"]
    ev = ModelPromoted.model_validate(payload)
    assert ev.version == "v1" and ev.parent_version is None and ev.ollama_model == "venom-adapter-v1"
    assert ev.adapter_sha256 == v1["adapter_sha256"] and ev.modelfile_path == str(vdir / "Modelfile")
    assert payload["gguf_path"] == str(vdir / "adapter.gguf") and payload["ollama_created"] is False

    active = json.loads(arena_settings.active_adapter_path.read_text())
    assert active["version"] == "v1" and active["adapter_path"] == v1["adapter_path"]
    assert active["ollama_model"] == "venom-adapter-v1" and active["base_model"] == str(tiny_base_model)

    # The GGUF is a LoRA adapter llama.cpp can read: read it back and compare with the safetensors.
    check = r"""
import json, sys, gguf, numpy as np
from safetensors.numpy import load_file
r = gguf.GGUFReader(sys.argv[1])
f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
t = {x.name: np.asarray(x.data) for x in r.tensors}
st = load_file(sys.argv[2] + "/adapter_model.safetensors")
cfg = json.load(open(sys.argv[3] + "/config.json"))
a = st["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
b = st["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
n = cfg["num_attention_heads"]
perm = b.reshape(n, 2, b.shape[0] // n // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)
print(json.dumps({"fields": f, "count": len(t),
                  "down_a": bool(np.array_equal(t["blk.1.ffn_down.weight.lora_a"], a)),
                  "q_b_permuted": bool(np.array_equal(t["blk.1.attn_q.weight.lora_b"], perm)),
                  "q_b_differs": bool(not np.array_equal(perm, b))}))
"""
    proc = subprocess.run([str(trainer_python), "-c", check, str(vdir / "adapter.gguf"), v1["adapter_path"],
                           str(tiny_base_model)], capture_output=True, text=True, env=trainer_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["fields"]["general.architecture"] == "llama" and info["fields"]["general.type"] == "adapter"
    assert info["fields"]["adapter.type"] == "lora" and info["fields"]["adapter.lora.alpha"] == 32.0
    assert info["count"] == 2 * 7 * 2  # two layers x seven target modules x (A, B)
    assert info["down_a"] and info["q_b_permuted"] and info["q_b_differs"]

    with pytest.raises(PromotionRefused, match="already the champion"):
        await promote(arena_store, arena_settings, "v1", reason="again", now=NOW)
    with pytest.raises(PromotionRefused, match="no version v9"):
        await promote(arena_store, arena_settings, "v9", reason="x", now=NOW)


async def test_promote_refuses_missing_or_changed_files(
    no_gguf: Settings, arena_store: Store, trained_good: Path, tiny_base_model: Path
) -> None:
    v1 = register(no_gguf, arena_store, trained_good, tiny_base_model, "run-1")
    cfg = Path(v1["adapter_path"]) / "tokenizer_config.json"
    original = cfg.read_text()
    cfg.write_text(original.replace("2048", "4096"))
    with pytest.raises(PromotionRefused, match="checksum mismatch"):
        await promote(arena_store, no_gguf, "v1", reason="x", now=NOW)
    cfg.write_text(original)
    (Path(v1["adapter_path"]) / "adapter_config.json").rename(Path(v1["adapter_path"]) / "moved.json")
    with pytest.raises(PromotionRefused, match="files are missing"):
        await promote(arena_store, no_gguf, "v1", reason="x", now=NOW)
    assert Registry(arena_store, no_gguf).champion() is None
    assert outbox_rows(arena_store, "model.promoted") == []
    assert not no_gguf.active_adapter_path.exists()


async def test_rollback_restores_the_parent_then_the_base_model(
    no_gguf: Settings, arena_store: Store, trained_good: Path, trained_noise: Path, tiny_base_model: Path
) -> None:
    s = no_gguf
    reg = Registry(arena_store, s)
    register(s, arena_store, trained_good, tiny_base_model, "run-1")
    await promote(arena_store, s, "v1", reason="first", now=NOW)
    v2 = register(s, arena_store, trained_noise, tiny_base_model, "run-2")
    assert v2["parent"] == "v1"
    await promote(arena_store, s, "v2", reason="manual", now=NOW + timedelta(minutes=1))
    assert reg.get("v1")["status"] == "retired" and reg.champion()["version"] == "v2"

    later = NOW + timedelta(minutes=2)
    result = await rollback(arena_store, s, reason="tasks fail", now=later)
    assert reg.champion()["version"] == "v1" and reg.get("v1")["status"] == "champion"
    assert reg.get("v2")["status"] == "rejected"
    assert result["from_version"] == "v2" and result["to_version"] == "v1"
    rb = outbox_rows(arena_store, "model.rolled_back")
    assert len(rb) == 1 and rb[0]["payload"] == result["rolled_back"]
    ev = ModelRolledBack.model_validate(rb[0]["payload"])
    assert ev.from_version == "v2" and ev.to_version == "v1" and ev.reason == "tasks fail"
    promoted = outbox_rows(arena_store, "model.promoted")
    assert [r["payload"]["version"] for r in promoted] == ["v1", "v2", "v1"]
    restored = ModelPromoted.model_validate(promoted[-1]["payload"])
    assert restored.parent_version is None and "rollback from v2: tasks fail" in restored.reason
    assert restored.adapter_sha256 == reg.get("v1")["adapter_sha256"]
    # Both events were written in one transaction: consecutive outbox rows.
    ids = [r[0] for r in arena_store.conn.execute("SELECT id FROM outbox ORDER BY id DESC LIMIT 2")]
    assert ids[0] == ids[1] + 1
    assert json.loads(s.active_adapter_path.read_text())["version"] == "v1"
    assert [h["action"] for h in reg.get("v2")["history"]][-1] == "rolled_back"

    # From v1 (no parent) to the base model: only model.rolled_back, and "no adapter" for Venom.
    to_base = await rollback(arena_store, s, reason="v1 too", now=later + timedelta(minutes=1))
    assert to_base["to_version"] is None and to_base["promoted"] is None
    assert reg.champion() is None and reg.get("v1")["status"] == "rejected"
    ModelRolledBack.model_validate(to_base["rolled_back"])
    assert len(outbox_rows(arena_store, "model.promoted")) == 3
    active = json.loads(s.active_adapter_path.read_text())
    assert active["adapter_path"] is None and active["version"] is None
    assert active["base_model"] == str(tiny_base_model)
    with pytest.raises(PromotionRefused, match="no champion to roll back"):
        await rollback(arena_store, s, reason="again", now=later)


async def test_rollback_skips_an_ancestor_that_was_rolled_back(
    no_gguf: Settings, arena_store: Store, trained_good: Path, trained_noise: Path, tiny_base_model: Path
) -> None:
    s = no_gguf
    reg = Registry(arena_store, s)
    register(s, arena_store, trained_good, tiny_base_model, "run-1")
    await promote(arena_store, s, "v1", reason="first", now=NOW)
    register(s, arena_store, trained_noise, tiny_base_model, "run-2")  # parent v1
    await rollback(arena_store, s, reason="v1 bad", now=NOW)  # v1 -> base
    await promote(arena_store, s, "v2", reason="manual", now=NOW)
    result = await rollback(arena_store, s, reason="v2 bad", now=NOW)
    assert result["to_version"] is None and reg.champion() is None


async def test_sync_active_adapter_repairs_a_stale_file(
    no_gguf: Settings, arena_store: Store, trained_good: Path, tiny_base_model: Path
) -> None:
    register(no_gguf, arena_store, trained_good, tiny_base_model, "run-1")
    assert sync_active_adapter(arena_store, no_gguf, NOW) is False  # no champion, no file: nothing to say
    await promote(arena_store, no_gguf, "v1", reason="first", now=NOW)
    no_gguf.active_adapter_path.write_text(json.dumps({"version": None}))  # as if the daemon died before writing
    assert sync_active_adapter(arena_store, no_gguf, NOW) is True
    assert json.loads(no_gguf.active_adapter_path.read_text())["version"] == "v1"
    assert sync_active_adapter(arena_store, no_gguf, NOW) is False


async def test_ollama_create_through_the_http_api(
    no_gguf: Settings, arena_store: Store, trained_good: Path, trained_noise: Path, tiny_base_model: Path,
    fake_ollama: FakeOllama,
) -> None:
    s = no_gguf
    s.arena.ollama_url = fake_ollama.url
    s.arena.ollama_base = "qwen2.5:0.5b"
    v1 = register(s, arena_store, trained_good, tiny_base_model, "run-1")
    payload = await promote(arena_store, s, "v1", reason="first", now=NOW)
    assert payload["ollama_created"] is True
    body = fake_ollama.created["venom-adapter-v1"]
    assert body["from"] == "qwen2.5:0.5b" and body["stream"] is False
    # No GGUF (disabled here): the safetensors adapter goes up as blobs, each checked by digest.
    assert set(body["adapters"]) == {"adapter_model.safetensors", "adapter_config.json"}
    st = (Path(v1["adapter_path"]) / "adapter_model.safetensors").read_bytes()
    assert fake_ollama.blobs[body["adapters"]["adapter_model.safetensors"]] == st
    assert "<|im_start|>" in body["template"] and "<|im_end|>" in body["parameters"]["stop"]
    assert "FROM qwen2.5:0.5b" in (s.models_dir / "v1" / "Modelfile").read_text()
    assert len([r for r in fake_ollama.requests if r.startswith("POST /api/blobs")]) == 2

    register(s, arena_store, trained_noise, tiny_base_model, "run-2")
    fake_ollama.fail_create = True
    with pytest.raises(PromotionRefused, match="Ollama could not create venom-adapter-v2.*not found"):
        await promote(arena_store, s, "v2", reason="manual", now=NOW)
    assert Registry(arena_store, s).champion()["version"] == "v1"
    assert len(outbox_rows(arena_store, "model.promoted")) == 1
    # Every file is asked about first (HEAD); a blob Ollama already has is never uploaded twice.
    uploads = [r for r in fake_ollama.requests if r.startswith("POST /api/blobs")]
    heads = [r for r in fake_ollama.requests if r.startswith("HEAD /api/blobs")]
    assert len(heads) == 4 and len(uploads) == len(set(uploads)) >= 3

    s.arena.ollama_url = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(PromotionRefused, match="unreachable"):
        await promote(arena_store, s, "v2", reason="manual", now=NOW)


async def test_an_ollama_that_creates_no_adapter_models_does_not_fail_a_promotion(
    no_gguf: Settings, arena_store: Store, trained_good: Path, tiny_base_model: Path,
) -> None:
    """Ollama 0.34.1 refuses adapter models (#19): the promotion goes ahead without one and says why; the
    follower's ollama target serves the version merged into the base (tests/follower/test_ollama_target.py)."""
    from fixtures.ollama import start_ollama_api, stop_ollama_api
    from structlog.testing import capture_logs

    api, runner = await start_ollama_api(version="0.34.1", base_name="qwen2.5:0.5b", base_gguf=None)
    try:
        no_gguf.arena.ollama_url = api.url
        no_gguf.arena.ollama_base = "qwen2.5:0.5b"
        register(no_gguf, arena_store, trained_good, tiny_base_model, "run-1")
        with capture_logs() as logs:
            payload = await promote(arena_store, no_gguf, "v1", reason="first", now=NOW)
        assert payload["ollama_created"] is False
        assert Registry(arena_store, no_gguf).champion()["version"] == "v1"
        assert not [r for r in api.requests if r.startswith("create")]
        said = [e for e in logs if e["event"] == "ollama_model_not_created"]
        assert said and said[0]["ollama_version"] == "0.34.1" and said[0]["version"] == "v1", logs
    finally:
        await stop_ollama_api(api, runner)
