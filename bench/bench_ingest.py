"""Ingest throughput against a bare nats-py pull-consumer loop, idle RSS, and time to READY.

    .venv/bin/python bench/bench_ingest.py [--n 20000]

Both sides drain the same number of lessons, pre-published to a fresh stream on the same nats-server
(sync_interval: always), in the same run, with the same promise: ack each message only after the
transaction that stored it committed, SQLite in WAL with synchronous=FULL, idempotent by event id. The
bare loop does only that (parse, INSERT OR IGNORE, commit, ack); the daemon also validates against the
contract, checks for hostile JSON, writes the inbox row and the lesson row, and runs the policy.
Targets (issue #9): ratio >= 0.8 of the bare loop; idle RSS < 100 MB, READY < 3 s. It also prints what the
per-message isolation checks cost on top of pydantic's validation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from academyd.app import App
from academyd.embedded import find_server_binary, free_port, render_config
from academyd.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


def lesson(i: int) -> bytes:
    return json.dumps({
        "schema_version": 1, "event_id": f"ev-{i}", "lesson_id": f"lesson-{i}", "timestamp": "2026-11-20T10:00:00",
        "situation": f"The build of module {i % 97} failed on an import error after upgrading a dependency",
        "action": f"Pinned dependency {i} to the last good version and re-ran the test suite",
        "result": "Sukces ✅ tests pass", "feedback": "Pin early, upgrade deliberately", "tags": ["build"],
        "metadata": {"agent": "coder"},
    }).encode()


async def fill(js: object, stream: str, subject: str, n: int) -> None:
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    for i in range(n):
        await js.publish(subject, lesson(i))


async def bare_loop(url: str, n: int, batch: int, round_: int, db: Path) -> float:
    """The fair baseline: the same promise with nothing else. Fetch a batch, parse each message, insert it
    (idempotent by event id) in one SQLite transaction (WAL, synchronous=FULL), commit, then ack each."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"BARE{round_}"
    await fill(js, stream, f"bare{round_}.lesson", n)
    await js.add_consumer(stream, ConsumerConfig(durable_name="bare", ack_policy=AckPolicy.EXPLICIT,
                                                 max_ack_pending=batch * 4))
    psub = await js.pull_subscribe_bind("bare", stream)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events(event_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
    t0 = time.perf_counter()
    done = 0
    while done < n:
        msgs = await psub.fetch(batch, timeout=2)
        rows = []
        for m in msgs:
            body = json.loads(m.data)
            rows.append((body["event_id"], m.data.decode()))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT OR IGNORE INTO events(event_id, body) VALUES (?, ?)", rows)
        conn.execute("COMMIT")
        for m in msgs:
            await m.ack()
        done += len(msgs)
    await nc.flush()
    elapsed = time.perf_counter() - t0
    conn.close()
    await nc.close()
    return elapsed


def decode_cost(n: int) -> tuple[float, float]:
    """CPU microseconds per lesson: pydantic's validation alone, and the daemon's decode (with the isolation
    checks: a key count, a NaN/NUL look; the strict parse only when they say so)."""
    from academyd.ingest import Inbound, decode
    from schemas.models import LessonCreated

    items = [Inbound("lesson.created", lesson(i), i) for i in range(n)]
    bare = full = float("inf")
    clock = time.thread_time  # CPU time: another process taking the core does not count against either
    for _ in range(5):  # alternating passes, the fastest of each
        t0 = clock()
        for it in items:
            LessonCreated.model_validate_json(it.data)
        bare = min(bare, clock() - t0)
        t0 = clock()
        for it in items:
            decode(it, 1 << 20)
        full = min(full, clock() - t0)
    return bare / n * 1e6, full / n * 1e6


async def daemon_drain(url: str, n: int, batch: int, data: Path, stream_suffix: str = "") -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    if stream_suffix:  # each round starts from an empty inbound stream
        try:
            await js.delete_stream("ACADEMY_INBOUND")
        except Exception:
            pass
    settings = load_settings(None, data_dir=data, log_level="warning",
                             nats={"url": url, "fetch_batch": batch}, http={"enabled": False},
                             training={"autorun": False})
    app = App(settings)
    await app.start()  # creates the streams and the consumer
    # Pre-publish while the daemon's consumer is bound but not fetching yet.
    for i in range(n):
        await js.publish("lesson.created", lesson(i), headers={"Nats-Msg-Id": f"ev-{i}"})
    t0 = time.perf_counter()
    task = asyncio.create_task(app.consume())
    while app.bus.stats.acked < n:
        await asyncio.sleep(0.005)
    await nc.flush()
    elapsed = time.perf_counter() - t0
    stored = app.store.counts()["lesson.created"]
    app.request_stop("bench")
    await task
    await app.stop()
    await nc.close()
    assert stored == n, f"stored {stored} of {n}"
    return elapsed


def ready_and_rss(tmp: Path) -> tuple[float, float]:
    sock_path = tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "ACADEMY_HTTP__ENABLED": "true",
           "ACADEMY_HTTP__PORT": "0", "ACADEMY_TRAINING__AUTORUN": "true"}
    t0 = time.perf_counter()
    # A fresh data directory: idle means nothing to ingest or train (the drain's 20,000 lessons would
    # rightly start a training run).
    proc = subprocess.Popen([str(Path(sys.executable).parent / "academyd"), "run", "--port", str(free_port()),
                             "--data-dir", str(tmp / "idle-data")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.perf_counter() - t0
        time.sleep(3)
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        return ready, rss_kb / 1024
    finally:
        proc.terminate()
        proc.wait(20)
        sock.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    args = ap.parse_args()
    bare_rates, academy_rates = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # The embedded server's config (sync_interval: always) without its credentials, so that both
        # sides connect alike.
        port = free_port()
        (tmp / "nats").mkdir()
        (tmp / "nats" / "nats.conf").write_text(render_config(tmp / "nats" / "js", port))
        proc = subprocess.Popen([str(find_server_binary()), "-c", str(tmp / "nats" / "nats.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"nats://127.0.0.1:{port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        try:
            for r in range(args.rounds):  # alternate, so the machine's mood hits both sides alike
                bare_rates.append(args.n / await bare_loop(url, args.n, args.batch, r, tmp / f"bare{r}.db"))
                academy_rates.append(args.n / await daemon_drain(url, args.n, args.batch, tmp / f"data{r}",
                                                                 stream_suffix=str(r)))
        finally:
            proc.terminate()
            proc.wait(10)
        ready, rss = ready_and_rss(tmp)
    validate_us, decode_us = decode_cost(args.n)
    bare_rate, academy_rate = statistics.median(bare_rates), statistics.median(academy_rates)
    # Each round's two sides ran back to back: the ratio per round cancels most of the machine's mood.
    ratios = [a / b for b, a in zip(bare_rates, academy_rates)]
    print(f"machine: {os.cpu_count()} cores; n={args.n} lessons, fetch batch {args.batch}, "
          f"median of {args.rounds} alternating rounds")
    print("rounds (bare, academyd msgs/s): " + ", ".join(f"({b:.0f}, {a:.0f})" for b, a in zip(bare_rates,
                                                                                                 academy_rates)))
    print(f"bare nats-py pull loop (parse+SQLite FULL+commit+ack): {bare_rate:10.0f} msgs/s")
    print(f"academyd (validate+SQLite FULL+inbox+commit+ack):      {academy_rate:10.0f} lessons/s")
    print("ratio per round: " + ", ".join(f"{r:.2f}" for r in ratios))
    print(f"ratio academyd / bare (median of the rounds' ratios):  {statistics.median(ratios):10.2f}  (target >= 0.8)")
    print(f"ratio of the medians:                                  {academy_rate / bare_rate:10.2f}")
    print(f"decode per lesson: pydantic alone {validate_us:.2f} us, with the isolation checks {decode_us:.2f} us "
          f"(+{decode_us - validate_us:.2f} us = {(decode_us - validate_us) * academy_rate / 1e4:.1f} % of the "
          "per-lesson ingest time)")
    print(f"time to READY (embedded nats-server):                  {ready:10.2f} s   (target < 3 s)")
    print(f"idle RSS of the daemon:                                {rss:10.1f} MB  (target < 100 MB)")


if __name__ == "__main__":
    asyncio.run(main())
