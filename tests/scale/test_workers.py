"""Training on `academyd worker` processes: real nats-server(s), real workers (own processes, own "hosts"),
the real trainer on the tiny model, the daemon deciding, registering and promoting.

Each worker runs in its own temporary directory with its own copy of the base model, mapped from the
daemon's reference with `--model`; the only thing shared with the daemon is NATS.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path
from typing import Any

import nats

from academyd.settings import load_settings
from fixtures.nats import db_count, lesson, publish, wait_for
from fixtures.trainer import FAST_HYPERPARAMETERS, WORDS

ACK_WAIT = 8.0  # heartbeat 2 s; a dead worker's job moves after 8 s + 6 s of lease silence


def reversal_lesson(i: int, rng: random.Random) -> dict[str, Any]:
    words = rng.sample(WORDS, 4)
    return lesson(i, situation=f"Reverse the order of these words: {' '.join(words)}", action=" ".join(reversed(words)),
                  result="Sukces ✅", feedback=None)


def daemon_settings(url: str, data_dir: Path, base: Path, trainer_python: Path, replicas: int = 1,
                    **training: Any) -> Any:
    workers = training.pop("workers", {})
    hp = {**FAST_HYPERPARAMETERS, "epochs": 4, "adjust": False, **training.pop("hyperparameters", {})}
    return load_settings(
        None, data_dir=data_dir, log_level="warning",
        nats={"url": url, "replicas": replicas, "ack_wait_s": 5.0, "backoff_s": [1.0, 2.0], "max_deliver": 10,
              "fetch_timeout_s": 0.2},
        http={"enabled": False},
        training={"autorun": True, "habitat": "nats", "base_model": str(base), "trainer_python": str(trainer_python),
                  "backend": "peft", "cpu_threads": 1, "seed": 1, "hyperparameters": hp, **training},
        workers={"ack_wait_s": ACK_WAIT, **workers},
        arena={"bootstrap_samples": 300, "generation_sample": 2, "generation_tolerance": 0.5},
    )


def host_model(tmp_path: Path, name: str, base: Path) -> Path:
    dest = tmp_path / "hosts" / name / "models" / "tiny"
    if not dest.exists():
        shutil.copytree(base, dest)
    return dest


def worker(start_worker: Any, tmp_path: Path, base: Path, url: str, name: str, *extra: str) -> Any:
    return start_worker(url, name, "--model", f"{base}={host_model(tmp_path, name, base)}", "--gpu", "none",
                        "--cpu-threads", "1", *extra, ACADEMY_WORKERS__ACK_WAIT_S=str(ACK_WAIT),
                        ACADEMY_NATS__REPLICAS=str(1 if "," not in url else 3))


async def lessons_in(d: Any, url: str, n: int = 80) -> None:
    nc = await nats.connect(servers=url.split(","))
    js = nc.jetstream()
    rng = random.Random(5)
    for i in range(n):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")
    await nc.close()
    await wait_for(lambda: db_count(d.app.settings.db_path, "SELECT COUNT(*) FROM lessons") >= n, timeout=30)


async def workers_advertised(url: str, n: int, timeout: float = 120) -> list[dict[str, Any]]:
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream()
        for _ in range(int(timeout * 2)):
            try:
                kv = await js.key_value("academy_workers")
                keys = await kv.keys()
                if len(keys) >= n:
                    return [json.loads((await kv.get(k)).value) for k in keys]
            except Exception:
                pass
            await asyncio.sleep(0.5)
        raise AssertionError(f"{n} workers did not advertise within {timeout} s")
    finally:
        await nc.close()


async def lease_history(url: str, run_id: str) -> list[dict[str, Any]]:
    nc = await nats.connect(servers=url.split(","))
    try:
        kv = await nc.jetstream().key_value("academy_leases")
        return [json.loads(e.value) for e in await kv.history(run_id) if e.value]
    finally:
        await nc.close()


async def train(d: Any) -> str:
    reply = d.app.evaluate("command", force=True, reason="test")
    assert reply["ok"], reply
    return str(reply["run_id"])


async def test_a_run_is_trained_on_a_worker_and_promoted(
    nats_server, start_daemon, start_worker, tiny_base_model, trainer_python, tmp_path
) -> None:
    url = nats_server.url
    settings = daemon_settings(url, tmp_path / "daemon" / "data", tiny_base_model, trainer_python)
    w1 = worker(start_worker, tmp_path, tiny_base_model, url, "w1")
    ads = await workers_advertised(url, 1)
    assert ads[0]["worker"] == "w1" and ads[0]["gpu"] is None and ads[0]["trainer"]["torch"].startswith("2.13")
    d = await start_daemon(settings)
    await lessons_in(d, url)
    run_id = await train(d)
    store = d.app.store
    await wait_for(lambda: store.get_run(run_id)["state"] in ("succeeded", "failed", "refused"), timeout=400,
                   interval=0.5)
    run = store.get_run(run_id)
    assert run["state"] == "succeeded", (run, w1.log[-3000:])
    assert run["habitat"] == "nats"
    history = await lease_history(url, run_id)
    final = history[-1]
    assert final["state"] == "succeeded" and final["worker"] == "w1"
    from academyd.registry import Registry

    model = Registry(store, settings).get(run["version"])
    # The adapter the daemon registered is the one the worker computed, byte for byte.
    assert model["adapter_sha256"] == final["result"]["adapter_sha256"]
    assert Registry(store, settings).champion()["version"] == run["version"]
    # The worker trained on its own copies: nothing under the daemon's data directory.
    spec = json.loads((w1.root / "work" / "jobs" / run_id / "spec.json").read_text())
    assert str(settings.data_dir) not in json.dumps(spec)
    assert spec["dataset_path"].startswith(str(w1.root))
    assert json.loads((Path(model["adapter_path"]) / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_base_model)
