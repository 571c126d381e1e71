"""The whole loop on a real nats-server with the daemon, the process habitat and the tiny offline model.

120 successful lessons published from outside, with the last training more than 24 h ago, lead to a
dataset, a training run, an evaluation and a promotion; a subscriber receives `model.promoted` whose
adapter exists, whose sha256 matches, and which lowers held-out loss against the base.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

from fixtures.nats import lesson, publish, wait_for
from fixtures.trainer import FAST_HYPERPARAMETERS, WORDS

SUBJECTS = ["academy.dataset.built", "academy.training.>", "academy.evaluation.finished", "model.>"]


def reversal_lesson(i: int, rng: random.Random) -> dict[str, Any]:
    words = rng.sample(WORDS, 4)
    return lesson(
        i,
        situation=f"Reverse the order of these words: {' '.join(words)}",
        action=" ".join(reversed(words)),
        result="Sukces ✅",
        feedback=None,
    )


def pipeline_settings(make_settings: Any, base: Path, trainer_python: Path, **training: Any) -> Any:
    return make_settings(
        training={
            "autorun": True, "habitat": "process", "base_model": str(base), "trainer_python": str(trainer_python),
            "backend": "peft", "cpu_threads": 1, "seed": 1,
            "hyperparameters": {**FAST_HYPERPARAMETERS, "epochs": 4, "adjust": False}, **training,
        },
        arena={"bootstrap_samples": 500, "generation_sample": 4},
    )


async def listen(nc: Any) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def cb(msg: Any) -> None:
        seen.append((msg.subject, json.loads(msg.data)))

    for subject in SUBJECTS:
        await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return seen


def of(seen: list[tuple[str, dict[str, Any]]], subject: str) -> list[dict[str, Any]]:
    return [p for s, p in seen if s == subject]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_120_lessons_become_a_promoted_adapter(
    make_settings, start_daemon, nc, clock, tiny_base_model, trainer_python, tmp_path
) -> None:
    settings = pipeline_settings(make_settings, tiny_base_model, trainer_python)
    d = await start_daemon(settings)
    store = d.app.store
    # The last training ended more than 24 h ago (by the daemon's clock).
    earlier = store.create_run(reason="last week", forced=False, new_lessons=0, now=clock() - timedelta(hours=30))
    with store.transaction():
        store.set_run_state(earlier, "succeeded", clock() - timedelta(hours=25))
    seen = await listen(nc)
    js = nc.jetstream()
    rng = random.Random(5)
    for i in range(120):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")

    await wait_for(lambda: of(seen, "model.promoted") or of(seen, "academy.training.failed"), timeout=420,
                   interval=0.5)
    assert of(seen, "academy.training.failed") == [], of(seen, "academy.training.failed")
    requested = [p for p in of(seen, "academy.training.requested") if p["run_id"] != earlier]
    assert len(requested) == 1 and requested[0]["new_lessons"] >= 100  # the 100th lesson pulled the trigger
    run_id = requested[0]["run_id"]
    built = of(seen, "academy.dataset.built")
    assert built and built[-1]["run_id"] == run_id and built[-1]["examples"] >= 50
    assert of(seen, "academy.training.started")[0]["habitat"] == "process"
    progress = [p for p in of(seen, "academy.training.progress") if p["run_id"] == run_id]
    assert progress and progress[-1]["step"] > progress[0]["step"]
    assert of(seen, "academy.training.finished")[0]["version"] == "v1"
    verdict = of(seen, "academy.evaluation.finished")[0]
    assert verdict["version"] == "v1" and verdict["verdict"] == "promote"

    promoted = of(seen, "model.promoted")[0]
    assert promoted["version"] == "v1" and promoted["parent_version"] is None
    assert promoted["ollama_model"] == "venom-adapter-v1"
    adapter = Path(promoted["adapter_path"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert Path(promoted["modelfile_path"]).is_file()
    from academyd.registry import adapter_sha256

    assert adapter_sha256(adapter) == promoted["adapter_sha256"]
    m, base = promoted["metrics"], promoted["champion_metrics"]
    assert m["heldout_loss"] < base["heldout_loss"]
    active = json.loads((settings.data_dir / "active_adapter.json").read_text())
    assert active["version"] == "v1"

    # The run is over and recorded; the policy's clock restarts from it.
    await wait_for(lambda: store.get_run(run_id)["state"] == "succeeded", timeout=10)
    status = d.app.status()
    assert status["champion"] == "v1" and status["active_run"] is None
    # Lessons the dataset read stopped counting as new; the ones that arrived during curation still count.
    assert status["threshold"]["new_successful_lessons"] < 100
    assert len([p for p in of(seen, "academy.training.requested") if p["run_id"] != earlier]) == 1
