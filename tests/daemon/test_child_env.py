"""Least environment: what the daemon starts (the trainer through the process habitat, as a worker does;
the arena's trainer-side tools; the embedded nats-server) gets an allowlisted environment, so the page's
token, NATS passwords and any secret-looking variable of the parent never reach a child."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fixtures.nats import wait_for

from academyd.arena.contest import run_trainer_module
from academyd.childenv import allowed, child_env
from academyd.habitat.base import TrainingJob
from academyd.habitat.process import ProcessHabitat
from academyd.settings import load_settings
from academyd.trainer.spec import TrainSpec

SECRETS = {"ACADEMY_HTTP__TOKEN": "page-token-0123456789abcdef", "ACADEMY_NATS__PASSWORD": "nats-pw-0123456789",
           "VENOM_API_TOKEN": "venom-0123456789", "AWS_SECRET_ACCESS_KEY": "aws-0123456789",
           "HF_TOKEN": "hf_0123456789abcdef", "ACADEMY_ENDPOINT_TOKEN": "endpoint-0123456789"}
KEPT = {"OMP_NUM_THREADS": "1", "ACADEMY_TRAINER_NICE": "0", "HF_HOME": "/tmp/hf", "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize(("name", "ok"), [
    ("PATH", True), ("HOME", True), ("LANG", True), ("LC_ALL", True), ("OMP_NUM_THREADS", True),
    ("CUDA_VISIBLE_DEVICES", True), ("HF_HOME", True), ("ACADEMY_TRAINER_CALIBRATION", True),
    ("ACADEMY_BASE_CACHE", True),
    ("HF_TOKEN", False), ("HUGGING_FACE_HUB_TOKEN", False), ("ACADEMY_HTTP__TOKEN", False),
    ("ACADEMY_NATS__PASSWORD", False), ("ACADEMY_NATS__CREDS_FILE", False), ("ACADEMY_ENDPOINT_TOKEN", False),
    ("AWS_SECRET_ACCESS_KEY", False), ("GITHUB_TOKEN", False), ("VIRTUAL_ENV", False), ("PYTHONPATH", False),
    ("LD_PRELOAD", False), ("ACADEMY_HTTP__PORT", False), ("OPENAI_API_KEY", False),
])
def test_allowlist(name: str, ok: bool) -> None:
    assert allowed(name) is ok


def test_child_env_keeps_what_runs_and_what_the_caller_passes() -> None:
    env = child_env({"ACADEMY_TRAINER_PARENT": "1:2"}, pythonpath="/src",
                    environ={"PATH": "/bin", **SECRETS, **KEPT})
    assert env == {"PATH": "/bin", **KEPT, "ACADEMY_TRAINER_PARENT": "1:2", "PYTHONPATH": "/src"}


def secret_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's environment holds secrets (set after the test's settings are loaded: the daemon's own
    settings would read ACADEMY_* ones)."""
    for k, v in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(k, v)


def env_dumper(path: Path) -> Path:
    """A stand-in interpreter: writes the environment it got (JSON) to env.json beside its last argument
    (the trainer's spec file, or a path the test names) and answers one JSON line."""
    path.write_text("#!/bin/sh\nfor last; do :; done\nexec python3 -c 'import json, os, sys; "
                    "open(os.path.join(os.path.dirname(sys.argv[1]), \"env.json\"), \"w\")"
                    ".write(json.dumps(dict(os.environ))); print(json.dumps(dict(ok=1)))' \"$last\"\n")
    path.chmod(0o755)
    return path


def assert_clean(env: dict[str, str]) -> None:
    leaked = {k for k in env if k in SECRETS or any(v in val for v in SECRETS.values() for val in [env[k]])}
    assert not leaked, leaked
    for k, v in KEPT.items():
        assert env.get(k) == v, k
    assert env.get("PATH")


async def test_the_trainer_started_by_the_process_habitat_sees_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_parent(monkeypatch)
    py = env_dumper(tmp_path / "python")
    out = tmp_path / "run"
    spec = TrainSpec.from_dict({"base_model": str(tmp_path / "base"), "dataset_path": str(tmp_path / "d.jsonl"),
                                "heldout_path": str(tmp_path / "h.jsonl"), "output_dir": str(out),
                                "format": "alpaca"})
    habitat = ProcessHabitat(py, poll_s=0.05)
    await habitat.start(TrainingJob(spec=spec, run_id="r-env", time_limit_s=60))
    await wait_for(lambda: (out / "env.json").exists(), timeout=20)
    env = json.loads((out / "env.json").read_text())
    assert_clean(env)
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONPATH"]


async def test_an_arena_tool_sees_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data")
    settings.training.trainer_python = env_dumper(tmp_path / "python")
    secret_parent(monkeypatch)
    await run_trainer_module(settings, "academyd.arena.measure", [str(tmp_path / "x")], time_limit_s=30, what="env")
    assert_clean(json.loads((tmp_path / "env.json").read_text()))


async def test_the_embedded_nats_server_sees_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_daemon
) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data", log_level="warning", http={"enabled": False},
                             training={"autorun": False}, nats={"embedded_port": 0, "embedded_monitor_port": 0})
    secret_parent(monkeypatch)
    d = await start_daemon(settings)
    pid = d.app.embedded.proc.pid
    raw = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
    env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    assert_clean(env)
