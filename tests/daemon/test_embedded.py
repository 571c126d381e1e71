"""`academyd run` as a user runs it: embedded server, sd_notify, SIGTERM, Venom import."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from pathlib import Path

import nats

from academyd.embedded import free_port
from fixtures.nats import daemon_cmd, daemon_env, db_count, lesson, publish, wait_for


async def test_run_starts_the_embedded_server_and_a_client_lesson_reaches_the_store(tmp_path: Path) -> None:
    port = free_port()
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.setblocking(False)
    env = daemon_env(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000", ACADEMY_HTTP__ENABLED="false",
                     ACADEMY_TRAINING__AUTORUN="false")
    # A fresh directory, nothing else running, no NATS URL: the daemon brings its own server.
    proc = subprocess.Popen(daemon_cmd("run", "--port", str(port)), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    messages: list[str] = []

    def received(what: str) -> bool:
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except BlockingIOError:
            pass
        return any(what in m for m in messages)

    try:
        await wait_for(lambda: received("READY=1"), timeout=20)
        # READY only once the database is migrated and the consumer is bound.
        db = tmp_path / "data" / "academy.db"
        assert db_count(db, "SELECT COUNT(*) FROM schema_migrations") >= 1
        # Credentials were generated at first start; the daemon's own identity manages the streams.
        users = tmp_path / "data" / "nats" / "users"
        url = f"nats://127.0.0.1:{port}"
        daemon_pw = (users / "academyd.password").read_text().strip()
        nc = await nats.connect(url, user="academyd", password=daemon_pw)
        info = await nc.jetstream().consumer_info("ACADEMY_INBOUND", "academyd")
        assert str(getattr(info.config.ack_policy, "value", info.config.ack_policy)) == "explicit"
        await nc.close()
        assert (tmp_path / "data" / "nats" / "jetstream").is_dir()
        conf = (tmp_path / "data" / "nats" / "nats.conf").read_text()
        assert "sync_interval: always" in conf and "127.0.0.1" in conf

        # An agent publishes with the agent identity (what README tells Venom to use).
        nc = await nats.connect(url, user="agent", password=(users / "agent.password").read_text().strip())
        await publish(nc.jetstream(), "lesson.created", lesson(1), "ev-lesson-1")
        await nc.close()
        await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM lessons WHERE lesson_id='lesson-1'") == 1)
        await wait_for(lambda: received("WATCHDOG=1"), timeout=5)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert received("STOPPING=1")
        output = proc.stdout.read().decode() if proc.stdout else ""
        events = [json.loads(line)["event"] for line in output.splitlines() if line.startswith("{")]
        assert "daemon_ready" in events and "daemon_stopped" in events
        # The embedded server went down with the daemon.
        await asyncio.sleep(0.2)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


async def test_sigterm_mid_ingest_finishes_the_batch_and_loses_nothing(nats_server, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = daemon_env(ACADEMY_HTTP__ENABLED="false", ACADEMY_TRAINING__AUTORUN="false",
                     ACADEMY_NATS__FETCH_BATCH="50")
    cmd = daemon_cmd("run", "--nats-url", nats_server.url, "--data-dir", str(data))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    db = data / "academy.db"
    try:
        for _ in range(200):
            try:
                await js.consumer_info("ACADEMY_INBOUND", "academyd")
                break
            except Exception:
                await asyncio.sleep(0.05)
        for i in range(2000):
            await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
        await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM lessons") > 100, interval=0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        kept = db_count(db, "SELECT COUNT(*) FROM lessons")
        info = await js.consumer_info("ACADEMY_INBOUND", "academyd")
        # The batch in hand was finished and acked; whatever was not stored is still pending.
        assert info.num_ack_pending == 0
        assert kept + info.num_pending == 2000
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM lessons") == 2000, timeout=30)
        await asyncio.sleep(2.5)
        assert db_count(db, "SELECT COUNT(*) FROM lessons") == 2000
    finally:
        await nc.close()
        proc.kill()
        proc.wait()


def write_venom(root: Path) -> None:
    mem = root / "data" / "memory"
    mem.mkdir(parents=True)
    lessons = [
        {"lesson_id": f"L{i}", "timestamp": "2026-10-01T12:00:00", "situation": f"situation {i}",
         "action": f"action {i}", "result": "SUKCES" if i % 3 else "błąd", "feedback": "ok", "tags": ["x"],
         "metadata": {}}
        for i in range(30)
    ]
    (mem / "lessons.json").write_text(json.dumps({"lessons": lessons, "count": 30, "last_updated": "2026-10-01"}))
    tasks = {"tasks": [
        {"id": "T1", "content": "write a haiku", "status": "COMPLETED", "result": "five seven five", "logs": []},
        {"id": "T2", "content": "deploy", "status": "FAILED", "result": "boom", "logs": ["err"]},
        {"id": "T3", "content": "still running", "status": "PROCESSING", "result": None, "logs": []},
    ]}
    (mem / "state_dump.json").write_text(json.dumps(tasks))


async def test_import_venom_twice_adds_nothing(make_settings, start_daemon, nats_server, tmp_path: Path) -> None:
    d = await start_daemon(make_settings())
    write_venom(tmp_path / "venom")
    cmd = daemon_cmd("import-venom", str(tmp_path / "venom"), "--nats-url", nats_server.url, "--json")
    out = subprocess.run(cmd, env=daemon_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    assert first["lessons"] == 30 and first["tasks"] == 2 and first["published"] == 32
    store = d.app.store
    await wait_for(lambda: store.counts()["lesson.created"] == 30 and store.counts()["task.completed"] == 2)
    assert store.snapshot().new_successful_lessons == 20  # Venom's rule: SUKCES counts, błąd does not

    second = json.loads(subprocess.run(cmd, env=daemon_env(), capture_output=True, text=True, timeout=60).stdout)
    assert second["duplicates"] == 32 and second["published"] == 0
    await asyncio.sleep(1.0)
    assert store.counts() == {"lesson.created": 30, "commit.pushed": 0, "task.completed": 2}


def test_import_venom_without_files_says_what_to_pass(tmp_path: Path) -> None:
    out = subprocess.run(daemon_cmd("import-venom", str(tmp_path)), env=daemon_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "lessons.json" in out.stderr and "Venom's directory" in out.stderr
