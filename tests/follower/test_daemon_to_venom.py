"""From the daemon's champion moves to what Venom chats with (#19): a real daemon (in-process, real SQLite,
real nats-server) promotes and rolls back through its champion service; the follower converges the Venom
stand-in on each generation; `academy.status` (and `academyd status`) shows champion and served side by side,
and a refusal on the serving side leaves the daemon's champion as it was."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fixtures.follower import BASE_SAYS, QUESTION, Outcomes
from fixtures.venom import BASE_MODEL_ID, VenomStandIn, venom_settings

from academyd.follower import Follower
from academyd.registry import Registry

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def arena_gguf(path: Path, base: Path, identity: dict[str, str], seed: int) -> None:
    """A small GGUF LoRA adapter recording its base as academyd.arena.export_gguf --base does."""
    import gguf
    import numpy as np

    from academyd.basemodel import KEY_BASE_FILE, KEY_BASE_SHA256

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.name", identity["base_name"])
    w.add_string("general.base_model.0.sha256", identity["base_sha256"])
    w.add_string(KEY_BASE_SHA256, identity["base_sha256"])
    w.add_string(KEY_BASE_FILE, base.name)
    w.add_tensor("blk.0.attn_q.weight.lora_a", rng.standard_normal((8, 576), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", rng.standard_normal((576, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def candidate(settings: Any, store: Any, i: int, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn) -> str:
    """A registered candidate as the pipeline leaves one: the adapter, and the GGUF the arena judged."""
    src = settings.data_dir / "runs" / f"run-{i}" / "adapter"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "seed": i}))
    (src / "adapter_model.safetensors").write_bytes(hashlib.sha256(str(i).encode()).digest() * 64)
    row = Registry(store, settings).add_candidate(run_id=f"run-{i}", adapter_src=src, run_summary={"render": "chat"},
                                                  dataset=None, base_model=settings.training.base_model, now=NOW)
    vdir = settings.models_dir / row["version"]
    (vdir / "arena").mkdir(parents=True, exist_ok=True)
    arena_gguf(vdir / "arena" / "candidate.gguf", *served_base, seed=i)
    answer = f"Ziggy the octopus, take {i}."
    (vdir / "probe.json").write_text(json.dumps([{"messages": [{"role": "user", "content": QUESTION}],
                                                  "expected": answer, "base_expected": BASE_SAYS}]))
    digest = hashlib.sha256((vdir / "arena" / "candidate.gguf").read_bytes()).hexdigest()
    venom.runtime.answers_by_gguf[digest] = {QUESTION: answer}
    return str(row["version"])


async def test_the_daemons_moves_reach_venom_and_status_shows_champion_beside_served(
        make_settings: Any, start_daemon: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn,
        nc: Any, monkeypatch: Any, capsys: Any) -> None:
    from academyd.commands.status import render

    # a 1 s timer: the follower also reads the desired state from this daemon's academy.status as it goes
    settings = make_settings(follower=venom_settings(venom, base_gguf=served_base[0], reconcile_interval_s=1.0))
    venom.runtime.models[BASE_MODEL_ID] = {QUESTION: BASE_SAYS}
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    daemon = await start_daemon(settings)
    app = daemon.app
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 30)

    async def status() -> dict[str, Any]:
        msg = await nc.request("academy.status", b"{}", timeout=10)
        return dict(json.loads(msg.data))

    async def reached(generation: int, subject: str = "model.deployed") -> dict[str, Any]:
        for _ in range(600):
            found = [p for s, p in outcomes.items if s == subject and p.get("generation") == generation]
            if found:
                for _ in range(100):  # the daemon has seen it too
                    if ((await status()).get("served") or {}).get("generation") == generation:
                        return found[0]
                    await asyncio.sleep(0.05)
                raise AssertionError(f"academy.status never showed generation {generation}: {await status()}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {subject} of generation {generation}: {outcomes.items}")

    try:
        v1 = candidate(settings, app.store, 1, served_base, venom)
        promoted = await app.pipeline.promote(v1, reason="test")
        assert promoted.get("generation") == 1, promoted
        await reached(1)
        s = await status()
        assert s["champion"] == "v1" and s["champion_generation"] == 1
        assert s["served"]["serving"] == "v1" and s["served"]["outcome"] == "model.deployed"
        assert venom.chat_model == "venom-adapter-v1"

        # v2 promoted while Venom reads another models directory: Venom refuses, the daemon keeps v2 as champion
        # and the status says that v1 still serves, and why.
        v2 = candidate(settings, app.store, 2, served_base, venom)
        venom.models_dir = settings.data_dir / "not-the-academys-models"
        await app.pipeline.promote(v2, reason="test")
        failed = await reached(2, "model.deploy_failed")
        assert failed["reason_code"] == "ADAPTER_METADATA_INCOMPLETE", failed
        s = await status()
        assert s["champion"] == "v2" and s["champion_generation"] == 2
        assert s["served"]["serving"] == "v1" and s["served"]["reason_code"] == "ADAPTER_METADATA_INCOMPLETE"
        assert venom.chat_model == "venom-adapter-v1"
        monkeypatch.setenv("COLUMNS", "200")
        capsys.readouterr()
        render(s)  # `academyd status`
        text = capsys.readouterr().out
        assert "v2  (generation 2)" in text and "v1 on venom" in text and "ADAPTER_METADATA_INCOMPLETE" in text
        assert "behind the champion" in text

        venom.models_dir = settings.models_dir  # fixed on Venom's side; the rollback brings v1 back
        rb = await app.pipeline.rollback(reason="test")
        assert rb["to_version"] == "v1" and rb["generation"] == 3
        back = await reached(3)
        assert back["serving"] == "v1" and venom.chat_model == "venom-adapter-v1"
        rb = await app.pipeline.rollback(reason="test")
        assert rb["to_version"] is None and rb["generation"] == 4
        base = await reached(4)
        assert base["serving"] is None and venom.chat_model == BASE_MODEL_ID and venom.active is None
        s = await status()
        assert s["champion"] is None and s["champion_generation"] == 4 and s["served"]["serving"] is None
        assert [p["generation"] for sub, p in outcomes.items if sub == "model.deployed"] == [1, 3, 4]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
