"""The champion under load and under races, in a daemon on a real nats-server with real adapters (the
tiny model's, trained once per session), real GGUF exports in the trainer's interpreter, and a stand-in
Ollama (a small aiohttp server, tests/fixtures/arena.py, slowed down to 3 s per create as a real one
restarting its runner would be).

- A drop in task success while lessons stream in: the daemon keeps storing and acking them at the rate
  they arrive during the rollback (ack latency measured from the daemon's own acks on `$JS.ACK.>`),
  rolls back exactly once, and a second drop inside the cooldown does nothing (one after it does).
- Promote and rollback commands racing each other and the monitor: the champion history is a chain,
  every move acted on the champion it was decided against, no verdict or watch decision moved twice.
- The event loop keeps turning during a promotion with a GGUF export (a loop-lag probe task).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from fixtures.nats import lesson, publish, wait_for

TASK_WINDOW = 20


def champion_settings(make_settings: Any, trainer_python: Path, ollama_url: str | None = None, **arena: Any) -> Any:
    return make_settings(
        training={"trainer_python": str(trainer_python)},
        arena={"watch_window": TASK_WINDOW, "watch_debounce_s": 0.3, "watch_cooldown_min": 60,
               "ollama_url": ollama_url, **arena},
    )


def register(app: Any, adapter_run: Path, base: Path, run_id: str) -> str:
    from academyd.arena import Verdict
    from academyd.registry import Registry

    reg = Registry(app.store, app.settings)
    row = reg.add_candidate(run_id=run_id, adapter_src=adapter_run / "adapter", run_summary={}, dataset=None,
                            base_model=str(base), now=app.clock())
    reg.record_verdict(row["version"], Verdict(promote=True, reasons=["test"], metrics={}), app.clock())
    return row["version"]


def task(version: str, i: int, ok: bool) -> dict[str, Any]:
    return {"schema_version": 1, "event_id": f"ev-task-{version}-{i}", "task_id": f"task-{version}-{i}",
            "content": f"Do thing {i}", "result": "done" if ok else "crashed",
            "status": "COMPLETED" if ok else "FAILED", "logs": [], "model_version": version}


def moves(app: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in app.store.conn.execute("SELECT * FROM champion_moves ORDER BY id")]


def assert_valid_chain(app: Any) -> list[dict[str, Any]]:
    """Every move starts from where the one before it ended; the alias and the statuses agree with the
    last move; no basis (verdict, watch decision) was acted on twice."""
    ms = moves(app)
    at: str | None = None
    for m in ms:
        assert m["from_version"] == at, ms
        assert m["to_version"] != m["from_version"], ms
        at = m["to_version"]
    alias = app.store.scalar("SELECT version FROM model_aliases WHERE alias='champion'")
    assert alias == at, (alias, ms)
    champions = [r[0] for r in app.store.conn.execute("SELECT version FROM models WHERE status='champion'")]
    assert champions == ([at] if at else []), champions
    bases = [m["basis"] for m in ms if m["basis"]]
    assert len(bases) == len(set(bases)), bases
    return ms


class AckClock:
    """When the daemon acked each inbound stream sequence: its acks are messages on `$JS.ACK.<stream>...`
    (the reply subject of each delivery), which any client of the account can see."""

    def __init__(self) -> None:
        self.acked_at: dict[int, float] = {}

    async def start(self, nc: Any, stream: str = "ACADEMY_INBOUND") -> None:
        async def cb(msg: Any) -> None:
            tokens = msg.subject.split(".")
            i = tokens.index(stream)
            self.acked_at.setdefault(int(tokens[i + 3]), time.monotonic())

        await nc.subscribe("$JS.ACK.>", cb=cb)
        await nc.flush()


async def stream_lessons(js: Any, sent: dict[int, float], stop: asyncio.Event, per_s: float = 40.0) -> None:
    i = 0
    while not stop.is_set():
        t = time.monotonic()
        ack = await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
        sent[ack.seq] = t
        i += 1
        await asyncio.sleep(max(0.0, 1 / per_s - (time.monotonic() - t)))


async def test_a_drop_rolls_back_once_while_ingest_keeps_acking_and_the_cooldown_holds(
    make_settings, start_daemon, nc, clock, trainer_python, tiny_base_model, trained_good, fake_ollama
) -> None:
    fake_ollama.create_delay_s = 3.0
    settings = champion_settings(make_settings, trainer_python, fake_ollama.url)
    d = await start_daemon(settings)
    app = d.app
    for n in (1, 2, 3):
        register(app, trained_good, tiny_base_model, f"run-{n}")
        assert (await app.champion.promote(f"v{n}", reason="setup"))["ok"]
    assert app.champion.current() == "v3"
    rolled: list[dict[str, Any]] = []

    async def on_rollback(msg: Any) -> None:
        rolled.append(json.loads(msg.data))

    await nc.subscribe("model.rolled_back", cb=on_rollback)
    acks = AckClock()
    await acks.start(nc)
    js = nc.jetstream()
    sent: dict[int, float] = {}
    stop = asyncio.Event()
    streamer = asyncio.create_task(stream_lessons(js, sent, stop))
    await asyncio.sleep(2.0)  # a baseline of acks before the drop

    # v3's tasks fail far more often than v2's (its parent) did: a real drop.
    fake_ollama.create_calls.clear()
    for i in range(TASK_WINDOW):
        await publish(js, "task.completed", task("v2", i, ok=i >= 2), None)
        await publish(js, "task.completed", task("v3", i, ok=i % 5 == 0), None)
    await wait_for(lambda: app.champion.current() == "v2", timeout=60)
    await asyncio.sleep(1.0)
    stop.set()
    await streamer
    await wait_for(lambda: all(seq in acks.acked_at for seq in sent), timeout=20)

    # Exactly one rollback, from the champion that dropped to its parent.
    await wait_for(lambda: rolled, timeout=10)
    assert [(r["from_version"], r["to_version"]) for r in rolled] == [("v3", "v2")]
    assert [m["action"] for m in assert_valid_chain(app)].count("rollback") == 1
    # The rollback's slow part (Ollama's create, 3 s) overlapped the stream: acks kept coming meanwhile.
    (c0, c1), = fake_ollama.create_calls
    assert c1 - c0 >= 3.0
    during = {seq: acks.acked_at[seq] - t for seq, t in sent.items() if c0 <= t <= c1 - 0.5}
    before = {seq: acks.acked_at[seq] - t for seq, t in sent.items() if t < c0 - 1.0}
    assert len(during) >= 0.8 * 40 * (c1 - c0 - 0.5), f"only {len(during)} lessons published during the rollback"
    lat_during = sorted(during.values())
    lat_before = sorted(before.values())
    p99 = lat_during[int(0.99 * (len(lat_during) - 1))]
    print(f"\nack latency before the drop: median {statistics.median(lat_before) * 1000:.0f} ms, max "
          f"{max(lat_before) * 1000:.0f} ms ({len(lat_before)} lessons); during the rollback: median "
          f"{statistics.median(lat_during) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(lat_during) * 1000:.0f} ms "
          f"({len(lat_during)} lessons, rollback's Ollama create {c1 - c0:.1f} s)")
    assert max(lat_during) < 1.0, "an ack waited for the rollback"
    assert app.store.counts()["lesson.created"] == len(sent)

    # A second drop inside the cooldown: v2 now fails against v1; the monitor checks and does nothing.
    checks = app.monitor.checks
    for i in range(TASK_WINDOW):
        await publish(js, "task.completed", task("v1", i, ok=True), None)
        await publish(js, "task.completed", task("v2", 100 + i, ok=i % 5 == 0), None)
    await wait_for(lambda: app.monitor.checks > checks and app.store.counts()["task.completed"] == 4 * TASK_WINDOW,
                   timeout=20)
    assert "cooling down" in await app.monitor.check()
    await asyncio.sleep(1.0)
    assert app.champion.current() == "v2" and len(rolled) == 1
    # After the cooldown the same evidence rolls back (the cooldown was what held it).
    clock.advance(minutes=settings.arena.watch_cooldown_min + 1)
    app.monitor.poke()
    await wait_for(lambda: app.champion.current() == "v1", timeout=30)
    await wait_for(lambda: len(rolled) == 2, timeout=10)
    assert_valid_chain(app)


async def test_promote_and_rollback_racing_each_other_and_the_monitor_keep_one_chain(
    make_settings, start_daemon, nc, clock, trainer_python, tiny_base_model, trained_good
) -> None:
    settings = champion_settings(make_settings, trainer_python, watch_cooldown_min=0)
    d = await start_daemon(settings)
    app = d.app
    for n in range(1, 6):
        register(app, trained_good, tiny_base_model, f"run-{n}")
    assert (await app.champion.promote("v1", reason="setup"))["ok"]
    assert (await app.champion.promote("v2", reason="setup"))["ok"]
    # v2's tasks dropped against v1's: the monitor has a reason to roll back while commands race it.
    js = nc.jetstream()
    for i in range(TASK_WINDOW):
        await publish(js, "task.completed", task("v1", i, ok=True), None)
        await publish(js, "task.completed", task("v2", i, ok=i % 4 == 0), None)
    await wait_for(lambda: app.store.counts()["task.completed"] == 2 * TASK_WINDOW)

    async def cmd(subject: str, body: dict[str, Any]) -> dict[str, Any]:
        return json.loads((await nc.request(subject, json.dumps(body).encode(), timeout=120)).data)

    calls = []
    for k in range(4):
        for v in ("v3", "v4", "v5"):
            calls.append(cmd("academy.cmd.promote", {"version": v, "reason": f"race {k}"}))
        calls.append(cmd("academy.cmd.rollback", {"reason": f"race {k}"}))
    # The same verdict acted on twice (the pipeline's auto-promotion against the same champion): one move.
    calls.append(app.champion.promote("v5", reason="verdict", expected="v2", basis="eval-v5-once"))
    calls.append(app.champion.promote("v5", reason="verdict", expected="v2", basis="eval-v5-once"))
    calls += [app.monitor.check() for _ in range(3)]
    before = len(moves(app))
    results = await asyncio.gather(*calls)

    ms = assert_valid_chain(app)
    replies = [r for r in results if isinstance(r, dict)]
    ok = [r for r in replies if r.get("ok")]
    watch_moves = [r for r in results if isinstance(r, str) and r.startswith("rolled_back")]
    assert len(ms) - before == len(ok) + len(watch_moves), (ms, results)
    refused = [r for r in replies if not r.get("ok")]
    assert refused, "many requests on one champion: some must have been refused"
    for r in refused:
        assert "refused" in r["error"] or "already the champion" in r["error"] or "no champion" in r["error"], r
    stale = [r for r in refused if "decided against" in r["error"]]
    print(f"\n{len(calls)} concurrent requests: {len(ok)} moved by request, {len(watch_moves)} by the watch, "
          f"{len(refused)} refused ({len(stale)} as stale: the champion moved after they were decided)")
    verdict_moves = [m for m in ms if m["basis"] == "eval-v5-once"]
    assert len(verdict_moves) <= 1
    assert sum(1 for m in ms if (m["basis"] or "").startswith("watch:v2:")) <= 1
    # active_adapter.json names the champion the chain ended at.
    active = json.loads(settings.active_adapter_path.read_text())
    assert active["version"] == app.champion.current()


async def test_the_loop_keeps_turning_during_a_promotion_with_a_gguf_export(
    make_settings, start_daemon, nc, trainer_python, tiny_base_model, trained_good
) -> None:
    settings = champion_settings(make_settings, trainer_python)
    d = await start_daemon(settings)
    app = d.app
    register(app, trained_good, tiny_base_model, "run-1")
    lags: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t - 0.005)

    task_ = asyncio.create_task(probe())
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    reply = json.loads((await nc.request("academy.cmd.promote", json.dumps({"version": "v1"}).encode(),
                                         timeout=300)).data)
    took = time.monotonic() - t0
    stop.set()
    await task_
    assert reply["ok"], reply
    gguf = Path(reply["gguf_path"])
    assert gguf.is_file() and gguf.stat().st_size > 0, "the promotion exported a GGUF adapter"
    print(f"\npromotion with GGUF export took {took:.1f} s; loop lag over {len(lags)} probes: max "
          f"{max(lags) * 1000:.1f} ms, p99 {sorted(lags)[int(0.99 * (len(lags) - 1))] * 1000:.1f} ms")
    assert max(lags) < 0.1
