"""Field tests: the loop run the way `make run` runs it, not the way the other tests set it up.

`academyd run` as a child process, its working directory a fresh empty directory, no `--data-dir`
(the relative default `data`), no `--nats-url` (the embedded nats-server it starts itself), the
default habitat (`auto`) and trainer interpreter. What differs from the defaults, and why:
- the thresholds: `arena.bootstrap_samples`, `generation_sample`, `generation_tolerance` (as in
  test_end_to_end: four greedy generations of a 0.5 M-parameter model are noise);
- the model: the tiny offline base model of tests/fixtures, with the fast hyperparameters that make it
  learn in seconds (`backend` peft, one CPU thread);
- the ports (`nats.embedded_port`, `http.port`): free ones, since other test runs share the machine.
The second test SIGKILLs the daemon during training and starts it again in the same directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import nats

from academyd.embedded import free_port
from fixtures.nats import daemon_cmd, daemon_env, db_count, publish, wait_for
from fixtures.trainer import FAST_HYPERPARAMETERS
from test_end_to_end import reversal_lesson

# What an agent may read (its identity may not subscribe to academy.cmd.*).
LIVE = ["academy.training.>", "academy.dataset.>", "academy.evaluation.>", "model.>"]


def field_env(base_model: Path, port: int) -> dict[str, str]:
    return daemon_env(
        ACADEMY_NATS__EMBEDDED_PORT=str(port),
        ACADEMY_HTTP__PORT=str(free_port()),
        ACADEMY_TRAINING__BASE_MODEL=str(base_model),
        ACADEMY_TRAINING__BACKEND="peft",
        ACADEMY_TRAINING__CPU_THREADS="1",
        ACADEMY_TRAINING__SEED="1",
        ACADEMY_TRAINING__HYPERPARAMETERS=json.dumps({**FAST_HYPERPARAMETERS, "epochs": 4, "adjust": False}),
        ACADEMY_ARENA__BOOTSTRAP_SAMPLES="500",
        ACADEMY_ARENA__GENERATION_SAMPLE="4",
        ACADEMY_ARENA__GENERATION_TOLERANCE="0.25",
        ACADEMY_ARENA__CPU_THREADS="1",
    )


class FieldDaemon:
    """`academyd run` in `cwd`, exactly the command `make run` runs (`.venv/bin/academyd run`)."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(daemon_cmd("run"), cwd=self.cwd, env=self.env,
                                     stdout=open(self.cwd / "daemon.log", "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return (self.cwd / "daemon.log").read_text(errors="replace")[-4000:]


def identity(daemon: FieldDaemon, name: str) -> dict[str, str]:
    """The credentials the daemon generated at its first start (README: "Talking to it")."""
    return {"user": name, "password": (daemon.cwd / "data" / "nats" / "users" / f"{name}.password").read_text().strip()}


async def connect(url: str, daemon: FieldDaemon) -> Any:
    """A client as Venom's agents connect: the `agent` identity, once the daemon is bound."""
    for _ in range(600):
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
        try:
            admin = await nats.connect(url, allow_reconnect=False, **identity(daemon, "academyd"))
            try:
                await admin.jetstream().consumer_info("ACADEMY_INBOUND", "academyd")  # ready once bound
            finally:
                await admin.close()
            return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                      **identity(daemon, "agent"))
        except Exception:  # not up yet (no credentials file, no server, no consumer)
            await asyncio.sleep(0.1)
    raise AssertionError("the daemon did not come up:\n" + daemon.log())


async def stream_events(url: str, subject: str, daemon: FieldDaemon) -> list[dict[str, Any]]:
    """Every `subject` event in the daemon's durable event stream (what Venom would consume)."""
    nc = await nats.connect(url, **identity(daemon, "agent"))
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True, stream="ACADEMY_EVENTS")
        out = []
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                return out
            out.append(json.loads(msg.data))
    finally:
        await nc.close()


def assert_absolute_and_present(promoted: dict[str, Any], data: Path) -> None:
    for key in ("adapter_path", "modelfile_path", "active_adapter_path"):
        p = Path(promoted[key])
        assert p.is_absolute() and p.exists(), (key, promoted[key])
        assert p.is_relative_to(data), (key, promoted[key])
    if promoted.get("gguf_path"):
        assert Path(promoted["gguf_path"]).is_absolute() and Path(promoted["gguf_path"]).is_file()
    active = json.loads(Path(promoted["active_adapter_path"]).read_text())
    assert active["version"] == promoted["version"]
    for key in ("adapter_path", "modelfile_path", "gguf_path"):
        if active.get(key):
            assert Path(active[key]).is_absolute() and Path(active[key]).exists(), (key, active[key])
    modelfile = Path(promoted["modelfile_path"]).read_text()
    adapter_line = next(line for line in modelfile.splitlines() if line.startswith("ADAPTER "))
    assert Path(adapter_line.split(" ", 1)[1]).is_absolute() and Path(adapter_line.split(" ", 1)[1]).exists()


async def publish_lessons(nc: Any, n: int) -> None:
    js = nc.jetstream()
    rng = random.Random(5)
    for i in range(n):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")


async def test_make_run_in_a_fresh_directory_trains_and_promotes(tmp_path, tiny_base_model) -> None:
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    daemon = FieldDaemon(cwd, field_env(tiny_base_model, port))
    daemon.start()
    try:
        nc = await connect(url, daemon)
        seen: list[tuple[str, dict[str, Any]]] = []

        async def cb(msg: Any) -> None:
            seen.append((msg.subject, json.loads(msg.data)))

        for s in LIVE:
            await nc.subscribe(s, cb=cb)
        await publish_lessons(nc, 120)
        done = await wait_for(lambda: [p for s, p in seen if s in ("model.promoted", "academy.training.failed")],
                              timeout=480, interval=0.5)
        assert [s for s, _ in seen if s == "academy.training.failed"] == [], (done, daemon.log())
        promoted = done[0]
        data = cwd / "data"
        assert data.is_dir() and (data / "academy.db").is_file()
        assert_absolute_and_present(promoted, data)
        # The dataset the trainer read was named by an absolute path too.
        spec = json.loads(next((data / "runs").glob("*/spec.json")).read_text())
        for key in ("dataset_path", "heldout_path", "output_dir"):
            assert Path(spec[key]).is_absolute() and Path(spec[key]).exists(), (key, spec[key])
        await nc.close()
    finally:
        daemon.stop()


async def test_sigkill_during_training_then_start_again_one_run_one_version(tmp_path, tiny_base_model) -> None:
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = field_env(tiny_base_model, port)
    # Long enough to kill the daemon mid-training.
    env["ACADEMY_TRAINING__HYPERPARAMETERS"] = json.dumps(
        {**FAST_HYPERPARAMETERS, "epochs": 6, "batch_size": 4, "adjust": False, "save_steps": 20})
    daemon = FieldDaemon(cwd, env)
    daemon.start()
    db = cwd / "data" / "academy.db"
    try:
        nc = await connect(url, daemon)
        progress: list[dict[str, Any]] = []

        async def cb(msg: Any) -> None:
            progress.append(json.loads(msg.data))

        await nc.subscribe("academy.training.progress", cb=cb)
        await publish_lessons(nc, 120)
        await wait_for(lambda: [p for p in progress if p.get("step", 0) >= 10], timeout=300, interval=0.2)
        await nc.close()
        daemon.kill()  # SIGKILL: no stop sequence at all; the embedded server goes with it
        assert db_count(db, "SELECT COUNT(*) FROM runs WHERE state='training'") == 1

        daemon.start()
        nc = await connect(url, daemon)
        await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM runs WHERE state IN ('succeeded','failed',"
                                            "'refused')") >= 1, timeout=480, interval=0.5)
        await nc.close()
        await asyncio.sleep(2)  # the outbox relay publishes what the last transaction queued
        assert db_count(db, "SELECT COUNT(*) FROM runs") == 1, daemon.log()
        assert db_count(db, "SELECT COUNT(*) FROM runs WHERE state='succeeded'") == 1, daemon.log()
        assert db_count(db, "SELECT COUNT(*) FROM models") == 1
        promoted = await stream_events(url, "model.promoted", daemon)
        assert [p["version"] for p in promoted] == ["v1"], promoted
        assert len(await stream_events(url, "academy.training.started", daemon)) == 1
        assert_absolute_and_present(promoted[0], cwd / "data")
    finally:
        daemon.stop()
