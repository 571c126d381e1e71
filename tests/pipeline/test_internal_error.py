"""A run failed by an internal error (a bug in the pipeline, not the trainer) has its training job cancelled
before it is failed: the next run never starts while this one's trainer still runs. A real process
habitat with a stand-in trainer that would run for minutes; real SQLite; the daemon's Pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

from fixtures.nats import wait_for

from academyd.champion import Champion
from academyd.events import Outbox
from academyd.habitat.base import TrainingJob
from academyd.habitat.process import _proc_stat
from academyd.pipeline import Pipeline
from academyd.settings import load_settings
from academyd.store import Store
from academyd.trainer.spec import TrainSpec
from academyd.trigger import Trigger

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


async def test_a_run_failed_by_an_internal_error_cancels_its_job_first(tmp_path: Path) -> None:
    trainer = tmp_path / "python"
    # A trainer that is still training, and stops on SIGTERM as the real one does.
    trainer.write_text("#!/bin/sh\nexec python3 -c 'import signal, sys, time; "
                       "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); open(\"ready\", \"w\").close(); "
                       "time.sleep(300)'\n")
    trainer.chmod(0o755)
    settings = load_settings(None, data_dir=tmp_path / "data",
                             training={"autorun": False, "habitat": "process", "trainer_python": str(trainer)})
    settings.data_dir.mkdir(parents=True)
    store = Store.open(settings.db_path)
    clock = lambda: T0  # noqa: E731
    outbox = Outbox(store)
    pipeline = Pipeline(settings, store, clock, outbox, Trigger(settings, store, clock, outbox),
                        Champion(store, settings, clock))

    run_id = store.create_run(reason="test", forced=True, new_lessons=0, now=T0)
    spec = TrainSpec.from_dict({"base_model": str(tmp_path / "base"), "dataset_path": str(tmp_path / "d.jsonl"),
                                "heldout_path": str(tmp_path / "h.jsonl"), "output_dir": str(tmp_path / "run"),
                                "format": "alpaca"})
    handle = await pipeline.habitat().start(TrainingJob(spec=spec, run_id=run_id, time_limit_s=600))
    with store.transaction():
        store.move_run(run_id, "curating", T0)
        store.move_run(run_id, "training", T0, job_ref=handle.ref, habitat="process")
    pid = int(json.loads((tmp_path / "run" / "job.json").read_text())["pid"])
    assert alive(pid)
    await wait_for(lambda: (tmp_path / "run" / "ready").exists(), timeout=20)  # it is training

    async def bug(run: dict) -> str:  # the pipeline's own code raising, the trainer still at work
        raise KeyError("dataset_id")

    pipeline._train = bug  # type: ignore[method-assign]
    states: list[tuple[str, bool]] = []
    real_fail = pipeline._fail

    def fail(rid: str, reason: str, refused: bool = False) -> None:
        states.append((reason, alive(pid)))  # is the trainer still there when the run is failed?
        real_fail(rid, reason, refused)

    pipeline._fail = fail  # type: ignore[method-assign]
    loop_task = asyncio.create_task(pipeline._loop())
    try:
        await wait_for(lambda: store.get_run(run_id)["state"] == "failed", timeout=30)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # whatever the outcome, no stand-in is left sleeping
    assert states == [("internal error: KeyError: 'dataset_id'", False)], states
    await pipeline.habitat().close()
    store.close()
    assert os.path.exists(tmp_path / "run" / "job.json")
