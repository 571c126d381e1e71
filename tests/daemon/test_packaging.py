"""The contract files, the settings, the systemd unit and the production NATS config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import schemas
from academyd.settings import SettingsError, load_settings
from fixtures.nats import daemon_cmd, daemon_env

REPO = Path(__file__).resolve().parents[2]


def test_committed_schema_files_match_the_models() -> None:
    docs = schemas.schema_documents()
    committed = {p.name: p.read_text() for p in (REPO / "schemas").glob("*.json")}
    assert set(committed) == set(docs), "run `academyd schemas export` and commit the result"
    drift = [name for name, text in docs.items() if committed[name] != text]
    assert drift == [], f"schema files drifted from the models: {drift}; run `academyd schemas export`"


def test_schemas_export_writes_one_file_per_subject(tmp_path: Path) -> None:
    out = subprocess.run(daemon_cmd("schemas", "export", "--out", str(tmp_path)), env=daemon_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert "lesson.created.json" in names and "model.promoted.json" in names
    lesson = (tmp_path / "lesson.created.json").read_text()
    for field in ("lesson_id", "timestamp", "situation", "action", "result", "feedback", "tags", "metadata"):
        assert f'"{field}"' in lesson


def test_settings_precedence_flags_env_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "academy.toml"
    toml.write_text('data_dir = "/from/toml"\n[policy]\nmin_lessons = 7\nmin_interval_h = 2\n'
                    '[nats]\nurl = "nats://toml:4222"\n')
    s = load_settings(toml)
    assert (str(s.data_dir), s.policy.min_lessons, s.nats.url) == ("/from/toml", 7, "nats://toml:4222")
    monkeypatch.setenv("ACADEMY_POLICY__MIN_LESSONS", "9")
    monkeypatch.setenv("ACADEMY_DATA_DIR", "/from/env")
    s = load_settings(toml)
    assert (str(s.data_dir), s.policy.min_lessons, s.policy.min_interval_h) == ("/from/env", 9, 2)
    s = load_settings(toml, data_dir=Path("/from/flag"))
    assert str(s.data_dir) == "/from/flag"


def test_every_path_setting_is_absolute_once_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults as `make run` has them: a relative data directory, resolved against the working
    directory at load, so that nothing handed on (the trainer's spec, model.promoted) is relative."""
    (tmp_path / "base").mkdir()
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    s = load_settings(repos={"venom": Path("src/venom")}, nats={"creds_file": "academy.creds"},
                      training={"trainer_python": "venv/bin/python", "base_model": "base",
                                "docker_mounts": ["hf-cache:/hf"]})
    assert s.data_dir == tmp_path / "data" and s.data_dir.is_absolute()
    assert s.db_path == tmp_path / "data" / "academy.db"
    for derived in (s.training_dir, s.models_dir, s.runs_dir, s.nats_dir, s.active_adapter_path):
        assert derived.is_absolute()
    assert s.repos["venom"] == tmp_path / "src" / "venom"
    assert s.nats.creds_file == tmp_path / "academy.creds"
    # A virtual environment's python is a symlink out of the environment: made absolute, not resolved.
    assert s.training.trainer_python == tmp_path / "venv" / "bin" / "python"
    assert s.training.base_model == str(tmp_path / "base")
    assert s.training.docker_mounts == [f"{tmp_path / 'hf-cache'}:/hf"]
    # A hub name is not a path.
    assert load_settings(training={"base_model": "HuggingFaceTB/SmolLM2-135M"}).training.base_model == (
        "HuggingFaceTB/SmolLM2-135M")
    monkeypatch.setenv("ACADEMY_DATA_DIR", "../elsewhere")
    assert load_settings().data_dir == tmp_path.parent / "elsewhere"


def test_settings_errors_say_what_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACADEMY_POLICY__MIN_LESSONS", "zero")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "policy.min_lessons" in str(err.value) and "ACADEMY_POLICY__MIN_LESSONS" in str(err.value)
    monkeypatch.delenv("ACADEMY_POLICY__MIN_LESSONS")
    monkeypatch.setenv("ACADEMY_NATS__USER", "only-user")
    with pytest.raises(SettingsError, match="set both or neither"):
        load_settings()
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_cli_reports_bad_settings_with_exit_code_2() -> None:
    out = subprocess.run(daemon_cmd("run"), env=daemon_env(ACADEMY_POLICY__MIN_INTERVAL_H="-3"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "policy.min_interval_h" in out.stderr


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/install-system-deps installs Debian's systemd"
    unit = (REPO / "systemd" / "academyd.service").read_text()
    for needed in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=academyd",
                   "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert needed in unit
    # Verify as installed: ExecStart pointing at this checkout's console script.
    installed = tmp_path / "academyd.service"
    installed.write_text(unit.replace("/opt/academyd/.venv/bin/academyd", str(Path(sys.executable).parent / "academyd")))
    out = subprocess.run([analyze, "verify", str(installed)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "academyd.service" not in out.stderr, out.stderr


def test_production_nats_config_is_valid_and_syncs_always() -> None:
    conf = REPO / "systemd" / "nats-server.conf"
    assert "sync_interval: always" in conf.read_text()
    env = {**os.environ, "VENOM_NATS_PASSWORD": "x", "OPERATOR_NATS_PASSWORD": "o", "ACADEMYD_NATS_PASSWORD": "y",
           "ACADEMY_WORKER_GPU1_NATS_PASSWORD": "w1", "ACADEMY_WORKER_GPU2_NATS_PASSWORD": "w2",
           "ACADEMY_FOLLOWER_NATS_PASSWORD": "f"}
    server = Path(sys.executable).parent / "nats-server"
    out = subprocess.run([str(server), "-t", "-c", str(conf)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "valid" in (out.stdout + out.stderr)


def test_the_env_example_loads_and_limits_the_trainer_container(monkeypatch: pytest.MonkeyPatch) -> None:
    example = REPO / "systemd" / "academyd.env.example"
    for line in example.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("ACADEMY_TRAINING__TRAINER_PYTHON", sys.executable)  # the example's is /opt/...
    settings = load_settings()
    t = settings.training
    assert t.docker_memory_mb > 0 and t.docker_cpus > 0 and t.docker_pids_limit > 0
    # The image is named by digest wherever the example names one; a tag is refused.
    assert "@sha256:" in example.read_text() and ":latest" not in example.read_text()
    monkeypatch.setenv("ACADEMY_TRAINING__DOCKER_IMAGE", "unsloth/unsloth:latest")
    with pytest.raises(SettingsError, match="not pinned by digest"):
        load_settings()
