"""The bridge's parts (#20): its systemd unit, and how it reads Venom's files (the cursor, half-written files,
appended lines, restarts). The bridge end to end, on a real nats-server and daemon, is
tests/pipeline/test_production.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from academyd.bridge import Bridge
from fixtures.nats import REPO
from schemas.models import Event


def test_bridge_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/install-system-deps installs Debian's systemd"
    unit = (REPO / "systemd" / "academyd-bridge.service").read_text()
    for needed in ("bridge-venom ${VENOM_DIR}", "Restart=always", "StateDirectory=academyd-bridge",
                   "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only"):
        assert needed in unit
    installed = tmp_path / "academyd-bridge.service"
    installed.write_text(unit.replace("/opt/academyd/.venv/bin/academyd", str(Path(sys.executable).parent / "academyd")))
    out = subprocess.run([analyze, "verify", str(installed)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "academyd-bridge.service" not in out.stderr, out.stderr


class Recorder:
    """Unit tests only: what the bridge would publish (the real bus is in tests/pipeline/test_production.py)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, subject: str, event: Event) -> bool:
        new = (subject, event.event_id) not in self.sent
        self.sent.append((subject, event.event_id))
        return new


def venom_dir(tmp_path: Path) -> Path:
    mem = tmp_path / "data" / "memory"
    mem.mkdir(parents=True)
    (tmp_path / "data" / "feedback").mkdir()
    return mem


def task(tid: str, status: str) -> dict[str, Any]:
    return {"id": tid, "content": "c", "status": status, "result": None, "logs": [], "context_history": {},
            "created_at": "2026-11-01T10:00:00Z"}


async def test_each_status_once_half_written_files_waited_for_and_the_cursor_survives(tmp_path: Path) -> None:
    mem = venom_dir(tmp_path)
    state = mem / "state_dump.json"
    fb = mem.parent / "feedback" / "feedback.jsonl"
    rec = Recorder()
    cursor = tmp_path / "cursor.json"
    b = Bridge(mem, rec, cursor, max_per_s=1000)
    state.write_text(json.dumps({"tasks": [task("a", "PENDING"), task("b", "COMPLETED")]}))
    whole = json.dumps({"tasks": [task("a", "PROCESSING"), task("b", "COMPLETED")]})
    state.write_text(whole[: len(whole) // 2])  # Venom caught in the middle of its write
    await b.poll()
    assert rec.sent == [] and b.stats.half_read == 1
    state.write_text(whole)
    line = json.dumps({"task_id": "a", "rating": "up", "timestamp": "2026-11-01T10:00:00"}) + "\n"
    fb.write_text(line + line[:12])  # the second line is still being written
    await b.poll()
    assert [s for s, _ in rec.sent] == ["task.completed", "task.completed", "feedback.given"]
    assert {e for _, e in rec.sent} >= {"venom-task-a-processing", "venom-task-b"}
    await b.poll()
    assert len(rec.sent) == 3  # nothing changed: nothing read, nothing sent
    with open(fb, "a") as f:
        f.write(line[12:])
    state.write_text(json.dumps({"tasks": [task("a", "COMPLETED"), task("b", "COMPLETED")]}))
    # A new bridge on the same cursor (a restart) sends only what is new: a's COMPLETED and the second line.
    again = Bridge(mem, rec, cursor, max_per_s=1000)
    await again.poll()
    assert rec.sent[3:] == [("task.completed", "venom-task-a"), ("feedback.given", rec.sent[3 + 1][1])]
    assert len({e for s, e in rec.sent if s == "feedback.given"}) == 1  # the same line content: the same id
    assert b.stats.bad == again.stats.bad == 0


async def test_the_bridge_publishes_as_the_agent_identity(make_settings, start_daemon, tmp_path: Path) -> None:
    """On the daemon's own embedded server (credentials required), `bridge-venom --once` pointed at the
    daemon's data directory publishes as `agent`: the new subjects are allowed to it and captured."""
    from fixtures.nats import daemon_cmd, daemon_env, wait_for

    d = await start_daemon(make_settings(nats={"url": None, "embedded_port": 0}))
    mem = venom_dir(tmp_path / "venom")
    (mem.parent / "learning").mkdir()
    (mem / "state_dump.json").write_text(json.dumps({"tasks": [task("a", "COMPLETED")]}))
    (mem.parent / "feedback" / "feedback.jsonl").write_text(
        json.dumps({"task_id": "a", "rating": "down", "timestamp": "2026-11-01T10:00:00"}) + "\n")
    (mem.parent / "learning" / "hidden_prompts.jsonl").write_text(
        json.dumps({"task_id": "a", "prompt": "p", "approved_response": "r", "prompt_hash": "h"}) + "\n")
    out = await asyncio.to_thread(
        subprocess.run, daemon_cmd("bridge-venom", str(tmp_path / "venom"), "--once", "--nats-url", d.app.nats_url,
                                   "--data-dir", str(d.app.settings.data_dir)),
        env=daemon_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    store = d.app.store
    await wait_for(lambda: store.feedback_count() == 1 and store.counts()["task.completed"] == 1
                   and store.scalar("SELECT COUNT(*) FROM approved_pairs") == 1)
    assert store.dlq_count() == 0
    assert store.scalar("SELECT served_version FROM tasks") is None


async def test_a_lost_cursor_sends_the_same_ids_again(tmp_path: Path) -> None:
    """Without its cursor a bridge sends everything again, under the same event ids: the bus's duplicate
    window or the daemon's inbox drops them all."""
    mem = venom_dir(tmp_path)
    (mem / "state_dump.json").write_text(json.dumps({"tasks": [task("a", "PROCESSING"), task("b", "FAILED")]}))
    (mem / "lessons.json").write_text(json.dumps({"lessons": [{"lesson_id": "L1", "situation": "s", "action": "a",
                                                               "result": "✅", "timestamp": "2026-11-01T10:00:00"}]}))
    (mem.parent / "feedback" / "feedback.jsonl").write_text(json.dumps({"task_id": "b", "rating": "down"}) + "\n")
    rec = Recorder()
    await Bridge(mem, rec, tmp_path / "c1.json").poll()
    again = Bridge(mem, rec, tmp_path / "c2.json")
    await again.poll()
    first, second = rec.sent[:4], rec.sent[4:]
    assert len(first) == 4 and second == first
    assert again.stats.published == 0 and again.stats.duplicates == 4
