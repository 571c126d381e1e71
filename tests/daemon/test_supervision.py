"""Supervised tasks: the outbox relay and the pipeline killed by a real SQLite error (injected with SQLite's
own authorizer on the daemon's connection, so the store refuses them as a damaged or locked table would)
are restarted with backoff, and the daemon reports itself unhealthy (academy.status, /healthz 503) until
they run again; a scheduler job that raises is reported too."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from fixtures.nats import wait_for
from fixtures.web import TOKEN

from academyd.health import Health
from academyd.supervise import supervise

FAST = {"restart_backoff_s": 0.05, "restart_backoff_max_s": 0.2, "healthy_after_s": 0.5}


def deny(store: Any, table: str) -> None:
    """Every statement that reads or writes `table` on this connection fails (sqlite3.DatabaseError)."""

    def authorizer(action: int, arg1: Any, arg2: Any, db: Any, source: Any) -> int:
        touches = action in (sqlite3.SQLITE_READ, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_INSERT,
                             sqlite3.SQLITE_DELETE) and arg1 == table
        return sqlite3.SQLITE_DENY if touches else sqlite3.SQLITE_OK

    store.conn.set_authorizer(authorizer)


def heal(store: Any) -> None:
    store.conn.set_authorizer(None)


async def healthz(app: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(app.web.url + "/healthz") as r:
        return r.status, await r.json()


@pytest.mark.parametrize(("table", "task", "component"), [("outbox", "outbox", "task:outbox"),
                                                         ("runs", "pipeline", "task:pipeline")])
async def test_a_task_killed_by_a_store_error_is_restarted_and_reported(
    make_settings, start_daemon, nc, table: str, task: str, component: str
) -> None:
    settings = make_settings(http={"enabled": True, "port": 0, "token": TOKEN}, supervision=FAST)
    d = await start_daemon(settings)
    app, store = d.app, d.app.store
    supervised = next(t for t in [*app._tasks, app.pipeline._task] if t is not None and t.get_name() == task)
    app.relay.kick()
    await asyncio.sleep(0.2)
    assert app.health.ok and (await healthz(app))[0] == 200

    deny(store, table)
    app.relay.kick()
    app.pipeline.wake()
    await wait_for(lambda: component in app.health.problems(), timeout=15)
    status, body = await healthz(app)
    assert status == 503 and component in body["problems"], body
    assert "DatabaseError" in body["problems"][component]["reason"]
    assert component in app.health.summary()  # what systemd's STATUS= says
    await asyncio.sleep(0.5)
    assert not supervised.done()  # never silently dead: still supervising, restarting with backoff

    heal(store)
    await wait_for(lambda: app.health.ok, timeout=15)
    assert (await healthz(app))[0] == 200
    # And it works again: a run requested now is published by the relay and seen by the pipeline.
    got: list[bytes] = []

    async def cb(msg: Any) -> None:
        got.append(msg.data)

    await nc.subscribe("academy.training.requested", cb=cb)
    await nc.flush()
    requested = app.evaluate("test", force=True, reason="after the fault")
    await wait_for(lambda: any(requested["run_id"].encode() in m for m in got), timeout=15)
    assert not supervised.done()


async def test_supervise_restarts_with_backoff_and_reports_until_it_holds() -> None:
    health, stop = Health(), asyncio.Event()
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def flaky() -> None:
        starts.append(loop.time())
        if len(starts) <= 3:
            raise sqlite3.OperationalError("disk I/O error")
        await stop.wait()

    task = asyncio.create_task(supervise("flaky", flaky, stop=stop, health=health, clock=lambda: datetime.now(UTC),
                                         first_s=0.05, max_s=1.0, healthy_after_s=0.3))
    await wait_for(lambda: len(starts) == 4, timeout=5)
    assert "task:flaky" in health.problems()
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] >= 0.04 and gaps[1] >= 0.09 and gaps[2] >= 0.19, gaps  # 0.05, 0.1, 0.2: doubling
    await wait_for(lambda: health.ok, timeout=5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(starts) == 4


async def test_a_scheduler_job_that_raises_is_reported_until_it_runs_well() -> None:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from academyd.supervise import watch_jobs

    health = Health()
    runs: list[int] = []

    async def tick() -> None:  # as the policy tick or the champion watch meeting a locked store once
        runs.append(1)
        if len(runs) == 1:
            raise sqlite3.OperationalError("database is locked")

    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(tick, "interval", seconds=0.3, id="policy", next_run_time=datetime.now(UTC))
    watch_jobs(scheduler, health, lambda: datetime.now(UTC))
    scheduler.start()
    try:
        await wait_for(lambda: "scheduler:policy" in health.problems(), timeout=5)
        assert "database is locked" in health.problems()["scheduler:policy"].reason
        await wait_for(lambda: health.ok, timeout=5)
        assert len(runs) >= 2
    finally:
        scheduler.shutdown(wait=False)
