"""The process habitat with a real trainer: progress stream, status, re-attach from a second habitat,
cancel, a job killed from outside, time and memory limits, and the factory."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from academyd.habitat import habitat_for
from academyd.habitat.base import Habitat, HabitatError, JobStatus, TrainingJob
from academyd.habitat.process import ProcessHabitat, default_trainer_python
from academyd.settings import Settings
from academyd.trainer import spec as S

pytestmark = pytest.mark.slow

# Long enough to still be running while the test watches it (it is always cancelled or stopped).
LONG = {"max_steps": 5000, "hyperparameters": {"logging_steps": 5, "save_steps": 40}}


async def take(stream: Any, until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Events from `stream` up to and including the first that satisfies `until`."""
    got = []
    async for event in stream:
        got.append(event)
        if until(event):
            break
    return got


def _job(handle: Any) -> dict[str, Any]:
    return json.loads((Path(handle.output_dir) / "job.json").read_text())


async def test_reattach_from_a_second_habitat_and_cancel(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], trainer_python: Path
) -> None:
    spec = make_spec(tmp_path / "run", backend="peft", **LONG)
    first = ProcessHabitat(trainer_python, poll_s=0.1)
    assert isinstance(first, Habitat)
    handle = await first.start(TrainingJob(spec=spec, run_id="r-1", time_limit_s=300))
    seen = await take(first.progress(handle), lambda e: e["type"] == "progress" and e["step"] >= 15)
    assert seen[0]["type"] == "start" and seen[0]["total_steps"] == 5000
    assert await first.status(handle) is JobStatus.RUNNING

    # One job per output directory.
    with pytest.raises(HabitatError, match="already runs"):
        await first.start(TrainingJob(spec=spec, run_id="r-1b"))

    # A second habitat (a restarted daemon) knows the job by its ref alone.
    second = ProcessHabitat(trainer_python, poll_s=0.1)
    again = await second.reattach(handle.ref)
    assert again is not None and again.ref == handle.ref and again.run_id == "r-1"
    assert await second.status(again) is JobStatus.RUNNING
    replay = await take(second.progress(again), lambda e: e["type"] == "progress" and e["step"] > seen[-1]["step"])
    assert replay[: len(seen)] == seen  # the attempt from its beginning, then live lines
    assert replay[-1]["step"] > seen[-1]["step"]

    await second.cancel(again, grace_s=20)
    result = await second.result(again)
    assert result.status is JobStatus.CANCELLED
    assert result.exit_code == S.EXIT_CANCELLED and result.error_code == "cancelled"
    assert result.summary is None and result.adapter_path is None
    assert await first.status(handle) is JobStatus.CANCELLED
    tail = [e async for e in first.progress(handle)]
    assert tail[-1]["type"] == "error" and tail[-1]["code"] == "cancelled"  # the trainer's own last word
    with pytest.raises(ProcessLookupError):
        os.killpg(_job(handle)["pgid"], 0)  # the whole group is gone
    assert not (tmp_path / "run" / S.ADAPTER_DIR).exists()
    await second.cancel(again)  # idempotent
    await first.close()
    await second.close()

    assert await second.reattach("process:" + str(tmp_path / "never-ran")) is None
    assert await second.reattach("docker:0123abcd") is None


async def test_job_killed_from_outside_is_lost_and_resumable(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], trainer_python: Path
) -> None:
    spec = make_spec(tmp_path / "run", backend="peft", **LONG)
    habitat = ProcessHabitat(trainer_python, poll_s=0.1)
    handle = await habitat.start(TrainingJob(spec=spec, run_id="r-2"))
    await take(habitat.progress(handle), lambda e: e["type"] == "checkpoint")
    os.killpg(_job(handle)["pgid"], signal.SIGKILL)  # the OOM killer, a reboot: no one writes anything

    later = ProcessHabitat(trainer_python, poll_s=0.1)
    again = await later.reattach(handle.ref)
    assert again is not None
    events = [e async for e in later.progress(again)]
    assert events[0]["type"] == "start" and events[-1]["type"] == "error"
    assert events[-1]["origin"] == "habitat" and events[-1]["code"] == "lost"
    result = await later.result(again)
    assert result.status is JobStatus.LOST and result.exit_code is None
    assert "resumes" in (result.reason or "")
    await habitat.close()

    # Starting the same spec again picks up the checkpoint.
    resumed = await later.start(TrainingJob(spec=spec, run_id="r-2"))
    start = await take(later.progress(resumed), lambda e: e["type"] == "start")
    assert start[-1]["resumed_from"] is not None and start[-1]["resumed_from"] >= 40
    await later.cancel(resumed, grace_s=20)
    assert (await later.result(resumed)).status is JobStatus.CANCELLED
    await later.close()


@pytest.mark.parametrize(
    ("limits", "code"),
    [({"time_limit_s": 2.0}, "time_limit"), ({"memory_limit_mb": 60}, "memory_limit")],
)
async def test_limits_stop_the_job(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], trainer_python: Path, limits: dict[str, Any], code: str
) -> None:
    spec = make_spec(tmp_path / "run", backend="peft", **LONG)
    habitat = ProcessHabitat(trainer_python, poll_s=0.1)
    handle = await habitat.start(TrainingJob(spec=spec, run_id="r-3", **limits))
    events = [e async for e in habitat.progress(handle)]
    result = await habitat.result(handle)
    await habitat.close()
    assert result.status is JobStatus.FAILED and result.error_code == code, result
    assert events[-1]["type"] == "error" and events[-1]["code"] == code
    assert "raise training." in (result.reason or "")
    assert not (tmp_path / "run" / S.ADAPTER_DIR).exists()


async def test_missing_trainer_environment_says_what_to_do(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec]
) -> None:
    habitat = ProcessHabitat(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(HabitatError, match="make trainer-env"):
        await habitat.start(TrainingJob(spec=make_spec(tmp_path / "run"), run_id="r-4"))


async def test_bad_spec_result_through_the_habitat(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], trainer_python: Path
) -> None:
    spec = make_spec(tmp_path / "run", dataset_path=str(tmp_path / "missing.jsonl"))
    habitat = ProcessHabitat(trainer_python, poll_s=0.1)
    handle = await habitat.start(TrainingJob(spec=spec, run_id="r-5"))
    events = [e async for e in habitat.progress(handle)]
    result = await habitat.result(handle)
    assert [e["type"] for e in events] == ["error"] and events[0]["code"] == "bad_input"
    assert result.status is JobStatus.FAILED and result.exit_code == S.EXIT_BAD_INPUT
    assert "missing.jsonl" in (result.reason or "")
    await habitat.close()


def test_habitat_for_settings(tmp_path: Path) -> None:
    explicit = habitat_for(Settings(training={"habitat": "process", "trainer_python": tmp_path / "py"}))
    assert isinstance(explicit, ProcessHabitat) and explicit.trainer_python == tmp_path / "py"
    default = habitat_for(Settings(training={"habitat": "process"}))
    assert isinstance(default, ProcessHabitat) and default.trainer_python == default_trainer_python()
    # `auto` belongs to the Docker habitat's tests (it depends on whether an engine answers).


async def test_a_start_of_the_same_run_adopts_its_running_job(
    tmp_path: Path, make_spec: Callable[..., S.TrainSpec], trainer_python: Path
) -> None:
    """A daemon that died after starting a job and before recording its ref: the next start of the same
    run (same spec) re-attaches the running trainer instead of starting a second one; also when the dying
    daemon never wrote the trainer's pid (the wrapper is found by its own arguments)."""
    spec = make_spec(tmp_path / "run", backend="peft", **LONG)
    first = ProcessHabitat(trainer_python, poll_s=0.1)
    handle = await first.start(TrainingJob(spec=spec, run_id="r-7", time_limit_s=300))
    await take(first.progress(handle), lambda e: e["type"] == "progress")
    pid = _job(handle)["pid"]
    await first.close()

    second = ProcessHabitat(trainer_python, poll_s=0.1)
    again = await second.start(TrainingJob(spec=spec, run_id="r-7", time_limit_s=300))
    assert again.ref == handle.ref and _job(again)["pid"] == pid
    await second.close()

    # The pid never reached job.json.
    record = _job(handle)
    (tmp_path / "run" / "job.json").write_text(json.dumps({**record, "pid": None, "pgid": None, "proc_start": None}))
    third = ProcessHabitat(trainer_python, poll_s=0.1)
    adopted = await third.start(TrainingJob(spec=spec, run_id="r-7", time_limit_s=300))
    assert _job(adopted)["pid"] == pid and await third.status(adopted) is JobStatus.RUNNING
    with pytest.raises(HabitatError, match="already runs"):  # another run may not take the directory
        await third.start(TrainingJob(spec=spec, run_id="r-8"))
    events = [e["type"] for e in [json.loads(line) for line in
              (tmp_path / "run" / S.EVENTS_FILE).read_text().splitlines()]]
    assert events.count("start") == 1  # one trainer, one attempt
    await third.cancel(adopted, grace_s=20)
    assert (await third.result(adopted)).status is JobStatus.CANCELLED
    await third.close()


async def test_the_event_stream_is_read_bounded_and_checked(tmp_path: Path) -> None:
    """A trainer that floods events.jsonl (6 MiB, more than one bounded read), with a 100 KiB line and an
    object of no known event type in it: the stream gives every protocol event in order and the `done`,
    nothing else, and the job succeeds. The process habitat reads through the same bounded reader as the
    Docker habitat (academyd.habitat.jobdir.read_events)."""
    fake = tmp_path / "fake-trainer"
    fake.write_text(f"#!{os.path.realpath(sys.executable)}\n" + '''
import json
with open("events.jsonl", "w") as fh:
    fh.write(json.dumps({"type": "start", "time": 1.0}) + "\\n")
    fh.write("x" * 100_000 + "\\n")
    fh.write(json.dumps({"type": "bogus", "time": 1.0}) + "\\n")
    for step in range(1, 6001):
        fh.write(json.dumps({"type": "progress", "time": 1.0, "step": step, "note": "p" * 1000}) + "\\n")
    fh.write(json.dumps({"type": "done", "time": 2.0, "exit_code": 0}) + "\\n")
''')
    fake.chmod(0o755)
    habitat = ProcessHabitat(fake, poll_s=0.1)
    spec = S.TrainSpec.from_dict({"base_model": str(tmp_path), "dataset_path": str(fake),
                                  "output_dir": str(tmp_path / "run")})
    handle = await habitat.start(TrainingJob(spec=spec, run_id="r-flood", time_limit_s=300))
    result = await habitat.result(handle)  # the job is over before the stream is read
    got = [e async for e in habitat.progress(handle)]
    assert os.path.getsize(tmp_path / "run" / S.EVENTS_FILE) > 6 << 20
    assert [e["type"] for e in got] == ["start", *["progress"] * 6000, "done"]
    assert [e["step"] for e in got if e["type"] == "progress"] == list(range(1, 6001))
    assert result.status is JobStatus.SUCCEEDED
    await habitat.close()
