"""Crashes: the daemon killed outright, the server restarted, a crash between a run and its event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from fixtures.nats import daemon_cmd, daemon_env, db_count, lesson, publish, wait_for

N = 5000


def spawn_daemon(url: str, data: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    e = daemon_env(
        ACADEMY_NATS__ACK_WAIT_S="2",
        ACADEMY_NATS__BACKOFF_S="[2, 2, 2]",
        ACADEMY_NATS__MAX_DELIVER="4",
        ACADEMY_NATS__FETCH_BATCH="100",
        ACADEMY_TRAINING__AUTORUN="false",
        ACADEMY_HTTP__ENABLED="false",
        **env,
    )
    return subprocess.Popen(
        daemon_cmd("run", "--nats-url", url, "--data-dir", str(data)),
        env=e, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )


async def publish_lessons(url: str, start: int, stop: int) -> None:
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream(timeout=10)
    try:
        for i in range(start, stop):
            for attempt in range(100):
                try:
                    await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
                    break
                except Exception:  # the server is restarting: the publisher retries, as a real one would
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"could not publish lesson {i}")
    finally:
        await nc.close()


async def wait_consumer(url: str) -> None:
    """The daemon is up once its durable consumer exists."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for _ in range(300):
            try:
                await js.consumer_info("ACADEMY_INBOUND", "academyd")
                return
            except Exception:
                await asyncio.sleep(0.05)
        raise AssertionError("the daemon did not bind its consumer")
    finally:
        await nc.close()


def stored(db: Path) -> int:
    return db_count(db, "SELECT COUNT(*) FROM lessons")


async def assert_exactly_once(db: Path) -> None:
    await wait_for(lambda: stored(db) == N, timeout=90, interval=0.2)
    await asyncio.sleep(3)  # past one ack wait: a redelivery would land now
    assert stored(db) == N
    assert db_count(db, "SELECT COUNT(DISTINCT lesson_id) FROM lessons") == N
    assert db_count(db, "SELECT COUNT(*) FROM inbox") == N


async def test_kill_9_mid_ingest_loses_nothing_and_stores_nothing_twice(nats_server, tmp_path) -> None:
    data, log = tmp_path / "data", tmp_path / "daemon.log"
    db = data / "academy.db"
    proc = spawn_daemon(nats_server.url, data, log)
    try:
        await wait_consumer(nats_server.url)
        publisher = asyncio.create_task(publish_lessons(nats_server.url, 0, N))
        await wait_for(lambda: stored(db) > 500, timeout=30, interval=0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = stored(db)
        assert killed_at < N, "the kill must land mid-ingest"
        await publisher
        proc = spawn_daemon(nats_server.url, data, log)
        await assert_exactly_once(db)
    finally:
        proc.kill()
        proc.wait()


async def test_nats_server_restart_mid_ingest(nats_server, tmp_path) -> None:
    data, log = tmp_path / "data", tmp_path / "daemon.log"
    db = data / "academy.db"
    proc = spawn_daemon(nats_server.url, data, log)
    try:
        await wait_consumer(nats_server.url)
        await publish_lessons(nats_server.url, 0, N // 2)
        await wait_for(lambda: stored(db) > 200, timeout=30)
        nats_server.kill()  # the hard way; JetStream was fsyncing every write (sync_interval: always)
        await asyncio.sleep(1.0)
        nats_server.start()
        await publish_lessons(nats_server.url, N // 2, N)
        await assert_exactly_once(db)
        assert proc.poll() is None, "the daemon rode out the restart"
    finally:
        proc.kill()
        proc.wait()


async def test_crash_between_recording_a_run_and_publishing_it(make_settings, start_daemon, nc, clock) -> None:
    from academyd.store import Store

    settings = make_settings()
    # The daemon recorded the run (and its outbox row) in one transaction, then died before publishing.
    store = Store.open(settings.db_path)
    run_id = store.create_run(reason="before the crash", forced=False, new_lessons=100, now=clock())
    store.close()
    js = nc.jetstream()
    got: list[Any] = []

    async def cb(msg: Any) -> None:
        got.append(json.loads(msg.data))

    await nc.subscribe("academy.training.requested", cb=cb)
    await nc.flush()
    d = await start_daemon(settings)
    await wait_for(lambda: len(got) == 1, timeout=5)
    await asyncio.sleep(0.5)
    assert [g["run_id"] for g in got] == [run_id]
    assert len(d.app.store.recent_runs()) == 1
    await d.stop()

    # A restart after a publish whose 'published' mark was lost: the server's duplicate window keeps
    # the stream at one copy.
    store = Store.open(settings.db_path)
    with store.transaction():
        store.conn.execute("UPDATE outbox SET published_at=NULL")
    store.close()
    d = await start_daemon(settings)
    await wait_for(lambda: d.app.store.scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL") == 0)
    info = await js.stream_info("ACADEMY_EVENTS", subjects_filter="academy.training.requested")
    assert info.state.messages == 1
    assert len(d.app.store.recent_runs()) == 1
