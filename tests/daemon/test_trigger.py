"""The training trigger against a real nats-server: thresholds, the 24 h clock, force, one active run."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

from fixtures.nats import lesson, publish, wait_for


async def collect(nc: Any, subject: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    async def cb(msg: Any) -> None:
        got.append({"data": json.loads(msg.data), "msg_id": (msg.headers or {}).get("Nats-Msg-Id")})

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return got


async def test_hundredth_successful_lesson_requests_exactly_one_training(make_settings, start_daemon, nc) -> None:
    d = await start_daemon(make_settings())
    requests = await collect(nc, "academy.training.requested")
    js = nc.jetstream()
    for i in range(99):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    # Failed lessons never count toward the threshold.
    for i in range(1000, 1020):
        await publish(js, "lesson.created", lesson(i, success=False), f"ev-lesson-{i}")
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 119)
    await asyncio.sleep(0.5)
    assert requests == []
    assert d.app.status()["threshold"]["new_successful_lessons"] == 99

    await publish(js, "lesson.created", lesson(99), "ev-lesson-99")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await wait_for(lambda: len(requests) >= 1, timeout=1.0, interval=0.01)
    assert loop.time() - t0 < 1.0
    await asyncio.sleep(0.5)
    assert len(requests) == 1
    req = requests[0]
    assert req["msg_id"] == req["data"]["run_id"]  # Nats-Msg-Id = run id
    assert req["data"]["new_lessons"] == 100
    runs = d.app.store.recent_runs()
    assert [r["run_id"] for r in runs] == [req["data"]["run_id"]]


async def test_interval_is_driven_by_the_policy_clock(make_settings, start_daemon, nc, clock) -> None:
    settings = make_settings()
    d = await start_daemon(settings)
    store = d.app.store
    # A training that ended 23 h 59 min ago (by the daemon's clock).
    run_id = store.create_run(reason="earlier", forced=False, new_lessons=0, now=clock() - timedelta(hours=24))
    with store.transaction():
        store.set_run_state(run_id, "succeeded", clock() - timedelta(hours=23, minutes=59))
    requests = await collect(nc, "academy.training.requested")
    await asyncio.sleep(0.3)
    requests.clear()  # the earlier run's own request event
    js = nc.jetstream()
    for i in range(150):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await wait_for(lambda: store.counts()["lesson.created"] == 150)
    await d.app._tick()
    await asyncio.sleep(0.5)
    assert requests == []
    status = d.app.status()
    assert status["next_eligible"] == (clock() + timedelta(minutes=1)).isoformat()

    clock.advance(seconds=59)
    await d.app._tick()
    await asyncio.sleep(0.3)
    assert requests == []

    clock.advance(seconds=2)  # now 24 h 0 min 1 s since the last training ended
    await d.app._tick()
    await wait_for(lambda: len(requests) == 1, timeout=2)
    await d.app._tick()
    await asyncio.sleep(0.3)
    assert len(requests) == 1, "a second tick must not request a second run while one is active"


async def test_force_skips_thresholds_but_never_a_second_run(make_settings, start_daemon, nc) -> None:
    d = await start_daemon(make_settings())
    requests = await collect(nc, "academy.training.requested")
    reply = json.loads((await nc.request("academy.cmd.train", b'{"force": true, "reason": "by hand"}', timeout=5)).data)
    assert reply["started"] is True and reply["run_id"].startswith("run-")
    again = json.loads((await nc.request("academy.cmd.train", b'{"force": true}', timeout=5)).data)
    assert again["started"] is False and reply["run_id"] in again["reason"]
    plain = json.loads((await nc.request("academy.cmd.train", b"{}", timeout=5)).data)
    assert plain["started"] is False
    await wait_for(lambda: len(requests) == 1, timeout=2)
    await asyncio.sleep(0.3)
    assert len(requests) == 1
    assert len(d.app.store.recent_runs()) == 1


async def test_bad_command_gets_a_clear_error(make_settings, start_daemon, nc) -> None:
    await start_daemon(make_settings())
    msg = await nc.request("academy.cmd.train", b'{"force": "maybe"}', timeout=5)
    assert msg.headers and msg.headers.get("Nats-Service-Error-Code") == "400"
    assert "force" in json.loads(msg.data)["error"]
    msg = await nc.request("academy.cmd.train", b"not json", timeout=5)
    assert msg.headers.get("Nats-Service-Error-Code") == "400"


async def test_status_reports_counts_progress_and_dlq(make_settings, start_daemon, nc) -> None:
    await start_daemon(make_settings())
    js = nc.jetstream()
    for i in range(5):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await publish(js, "lesson.created", b"{broken")
    msg = await nc.request("academy.status", b"", timeout=5)
    status = json.loads(msg.data)
    assert status["ok"] is True
    async def fresh() -> dict[str, Any]:
        return json.loads((await nc.request("academy.status", b"", timeout=5)).data)
    for _ in range(100):
        status = await fresh()
        if status["counts"]["lesson.created"] == 5 and status["dlq"]["count"] == 1:
            break
        await asyncio.sleep(0.05)
    assert status["counts"] == {"lesson.created": 5, "commit.pushed": 0, "task.completed": 0}
    assert status["threshold"]["new_successful_lessons"] == 5
    assert status["threshold"]["min_lessons"] == 100
    assert status["dlq"] == {"count": 1, "by_reason": {"not_json": 1}}
    assert status["active_run"] is None
