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
        # Four greedy generations of a 0.5 M-parameter model are noise; the held-out loss CI decides here.
        arena={"bootstrap_samples": 500, "generation_sample": 4, "generation_tolerance": 0.25},
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

    await wait_for(lambda: of(seen, "academy.evaluation.finished") or of(seen, "academy.training.failed"),
                   timeout=420, interval=0.5)
    assert of(seen, "academy.training.failed") == [], of(seen, "academy.training.failed")
    await wait_for(lambda: of(seen, "model.promoted"), timeout=30)
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

    # Every event the daemon published fits the contract agents validate against.
    from schemas.models import OUTBOUND

    for subject, payload in seen:
        OUTBOUND[subject].model_validate(payload)

    # The run is over and recorded; the policy's clock restarts from it.
    await wait_for(lambda: store.get_run(run_id)["state"] == "succeeded", timeout=10)
    status = d.app.status()
    assert status["champion"] == "v1" and status["active_run"] is None
    # Lessons the dataset read stopped counting as new; the ones that arrived during curation still count.
    assert status["threshold"]["new_successful_lessons"] < 100
    assert len([p for p in of(seen, "academy.training.requested") if p["run_id"] != earlier]) == 1


async def request(nc: Any, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    return json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=60)).data)


def task(i: int, version: str, ok: bool) -> dict[str, Any]:
    return {"schema_version": 1, "event_id": f"ev-task-{version}-{i}", "task_id": f"task-{version}-{i}",
            "content": f"Do thing {i}", "result": "done" if ok else "crashed", "status": "COMPLETED" if ok else "FAILED",
            "logs": [], "model_version": version}


async def test_promote_rollback_and_automatic_rollback_on_the_bus(
    make_settings, start_daemon, nc, tiny_base_model, trainer_python
) -> None:
    """v1 trained and promoted by the daemon; v2 registered from it; promote v2 and roll back by command
    (both events arrive), then a real drop in v2's task success rate rolls back by itself."""
    settings = pipeline_settings(make_settings, tiny_base_model, trainer_python)
    settings.arena.watch_window = 20
    d = await start_daemon(settings)
    seen = await listen(nc)
    js = nc.jetstream()
    rng = random.Random(9)
    for i in range(90):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 90)
    started = await request(nc, "academy.cmd.train", {"force": True, "reason": "first adapter"})
    assert started["started"] is True
    await wait_for(lambda: of(seen, "academy.evaluation.finished") or of(seen, "academy.training.failed"),
                   timeout=420, interval=0.5)
    assert of(seen, "academy.evaluation.finished")[0]["verdict"] == "promote", of(seen, "academy.evaluation.finished")
    await wait_for(lambda: of(seen, "model.promoted"), timeout=30)
    assert [p["version"] for p in of(seen, "model.promoted")] == ["v1"]

    # A second candidate (the same adapter, registered as another run's result) to move between.
    from academyd.arena import Verdict
    from academyd.registry import Registry

    reg = Registry(d.app.store, settings)
    v1 = reg.get("v1")
    v2 = reg.add_candidate(run_id="run-manual-v2", adapter_src=Path(v1["adapter_path"]), run_summary={},
                           dataset=None, base_model=v1["base_model"], now=d.app.clock())
    assert v2["version"] == "v2" and v2["parent"] == "v1"
    reg.record_verdict("v2", Verdict(promote=True, reasons=["manual"], metrics=v1.get("metrics") or {}),
                       d.app.clock())

    bad = await request(nc, "academy.cmd.promote", {"version": "v9"})
    assert bad["ok"] is False and "v9" in bad["error"]
    promoted = await request(nc, "academy.cmd.promote", {"version": "v2", "reason": "by hand"})
    assert promoted["ok"] is True and promoted["version"] == "v2"
    await wait_for(lambda: [p["version"] for p in of(seen, "model.promoted")] == ["v1", "v2"], timeout=10)
    assert of(seen, "model.promoted")[-1]["parent_version"] == "v1"

    rolled = await request(nc, "academy.cmd.rollback", {"reason": "it answers worse"})
    assert rolled["ok"] is True
    await wait_for(lambda: of(seen, "model.rolled_back") and len(of(seen, "model.promoted")) == 3, timeout=10)
    back = of(seen, "model.rolled_back")[-1]
    assert (back["from_version"], back["to_version"]) == ("v2", "v1")
    assert of(seen, "model.promoted")[-1]["version"] == "v1"
    assert d.app.status()["champion"] == "v1"
    assert json.loads(settings.active_adapter_path.read_text())["version"] == "v1"

    # v3: promoted, then its tasks fail far more often than v1's did -> the daemon rolls back by itself.
    v3 = reg.add_candidate(run_id="run-manual-v3", adapter_src=Path(v1["adapter_path"]), run_summary={},
                           dataset=None, base_model=v1["base_model"], now=d.app.clock())
    reg.record_verdict(v3["version"], Verdict(promote=True, reasons=["manual"], metrics={}), d.app.clock())
    assert (await request(nc, "academy.cmd.promote", {"version": v3["version"]}))["ok"] is True
    # Within noise first: 17/20 against v1's 36/40 -> no rollback (the anytime-valid watch, #20, counts v1's
    # record with its own uncertainty: 40 tasks at 90 % are at least 76 % at 97.5 %).
    for i in range(40):
        await publish(js, "task.completed", task(i, "v1", ok=i >= 4), f"ev-task-v1-{i}")
    for i in range(20):
        await publish(js, "task.completed", task(i, v3["version"], ok=i >= 3), f"ev-task-v3-{i}")
    await wait_for(lambda: d.app.store.counts()["task.completed"] == 60)
    await asyncio.sleep(1.0)
    assert d.app.status()["champion"] == v3["version"]
    # A real drop: the next 20 of v3's tasks mostly fail (21/39 below v1's bound after its 39th task).
    for i in range(20, 40):
        await publish(js, "task.completed", task(i, v3["version"], ok=i % 5 == 0), None)
    await wait_for(lambda: d.app.status()["champion"] == "v1", timeout=15)
    auto = of(seen, "model.rolled_back")
    await wait_for(lambda: len(of(seen, "model.rolled_back")) == 2, timeout=10)
    auto = of(seen, "model.rolled_back")[-1]
    assert auto["from_version"] == v3["version"] and auto["to_version"] == "v1"
    assert auto["reason"].startswith("automatic")

