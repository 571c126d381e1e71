"""Training runs in the daemon: events in order, re-attach after a daemon restart, failure with backoff."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from datetime import timedelta
from typing import Any

from fixtures.nats import publish, wait_for
from fixtures.trainer import FAST_HYPERPARAMETERS
from test_end_to_end import listen, of, pipeline_settings, request, reversal_lesson


async def test_a_lora_the_runtime_cannot_serve_is_refused_before_training(
    make_settings, start_daemon, nc, tiny_base_model, trainer_python
) -> None:
    settings = pipeline_settings(make_settings, tiny_base_model, trainer_python,
                                 hyperparameters={**FAST_HYPERPARAMETERS, "target_modules": ["q_proj", "embed_tokens"]})
    d = await start_daemon(settings)
    seen = await listen(nc)
    await seed_lessons(nc, 60)
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 60)
    run_id = (await request(nc, "academy.cmd.train", {"force": True}))["run_id"]
    await wait_for(lambda: of(seen, "academy.training.failed"), timeout=120)
    failed = of(seen, "academy.training.failed")[0]
    assert failed["run_id"] == run_id
    assert "'embed_tokens' cannot be served by llama.cpp" in failed["reason"], failed
    assert d.app.store.get_run(run_id)["state"] == "refused"
    assert of(seen, "academy.training.started") == []  # no trainer was started


async def seed_lessons(nc: Any, n: int) -> None:
    js = nc.jetstream()
    rng = random.Random(3)
    for i in range(n):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")


async def test_a_restarted_daemon_reattaches_the_running_job(
    make_settings, start_daemon, nc, tiny_base_model, trainer_python
) -> None:
    # Long enough to stop the daemon mid-run: many small steps.
    settings = pipeline_settings(make_settings, tiny_base_model, trainer_python, max_steps=400,
                                 hyperparameters={**FAST_HYPERPARAMETERS, "batch_size": 2, "epochs": 50,
                                                  "adjust": False, "save_steps": 100})
    d = await start_daemon(settings)
    seen = await listen(nc)
    await seed_lessons(nc, 80)
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 80)
    run_id = (await request(nc, "academy.cmd.train", {"force": True}))["run_id"]
    await wait_for(lambda: [p for p in of(seen, "academy.training.progress") if p["step"] >= 20], timeout=120)
    job_ref = d.app.store.get_run(run_id)["job_ref"]
    await d.stop()  # the trainer runs on in its own process group
    steps_at_stop = max(p["step"] for p in of(seen, "academy.training.progress"))

    d2 = await start_daemon(settings)
    await wait_for(lambda: of(seen, "academy.training.finished") or of(seen, "academy.training.failed"),
                   timeout=300, interval=0.5)
    assert of(seen, "academy.training.failed") == []
    run = d2.app.store.get_run(run_id)
    assert run["job_ref"] == job_ref, "the same job was re-attached, not started again"
    assert len(of(seen, "academy.training.started")) == 1
    finished = of(seen, "academy.training.finished")[0]
    assert finished["run_id"] == run_id and finished["version"] == "v1"
    later = [p["step"] for p in of(seen, "academy.training.progress") if p["step"] > steps_at_stop]
    assert later and max(later) == 400
    await wait_for(lambda: d2.app.store.get_run(run_id)["state"] in ("succeeded", "failed"), timeout=120)


async def test_a_failing_training_is_reported_and_retried_with_backoff(
    make_settings, start_daemon, nc, clock, tmp_path, trainer_python, tiny_base_model
) -> None:
    # A missing base is refused at daemon start (tests/model/test_basemodel.py); one that disappears
    # afterwards fails the runs, which are reported and retried.
    base = tmp_path / "base-that-goes"
    shutil.copytree(tiny_base_model, base)
    settings = pipeline_settings(make_settings, base, trainer_python)
    settings.policy.min_lessons = 50
    settings.policy.min_interval_h = 0
    d = await start_daemon(settings)
    shutil.rmtree(base)
    seen = await listen(nc)
    await seed_lessons(nc, 80)
    await wait_for(lambda: of(seen, "academy.training.failed"), timeout=120)
    failed = of(seen, "academy.training.failed")[0]
    assert "base model" in failed["reason"] or "base_model" in failed["reason"]
    run = d.app.store.get_run(failed["run_id"])
    assert run["state"] == "failed" and run["error"] == failed["reason"]
    status = d.app.status()
    assert status["active_run"] is None
    assert status["threshold"]["consecutive_failures"] == 1
    assert status["next_eligible"] == (clock() + timedelta(minutes=10)).isoformat()
    assert failed["retry_at"] == status["next_eligible"]

    # No retry inside the backoff...
    await d.app._tick()
    await asyncio.sleep(0.5)
    assert len(of(seen, "academy.training.requested")) == 1
    # ...and one after it, counted as attempt 2.
    clock.advance(minutes=10, seconds=1)
    await d.app._tick()
    await wait_for(lambda: len(of(seen, "academy.training.requested")) == 2, timeout=5)
    await wait_for(lambda: len(of(seen, "academy.training.failed")) == 2, timeout=120)
    second = of(seen, "academy.training.requested")[1]["run_id"]
    assert d.app.store.get_run(second)["attempt"] == 2
    assert d.app.status()["next_eligible"] == (clock() + timedelta(minutes=60)).isoformat()
    reply = await request(nc, "academy.status", {})
    assert reply["last_run"]["state"] == "failed" and json.dumps(reply)
