"""Datasets built again and again while 540 secret-bearing poison messages are dead-lettered, in a real
`academyd run` process on a real nats-server: no planted secret anywhere a user can read.

This is the race the old scanner lost (the DLQ excerpt scan on the loop and the curator's scan in a
worker thread toggled detect-secrets' global settings under each other; tokens reached datasets). The
secrets are the corpus's (tests/secrets/corpus.jsonl, 27 kinds); a secret counts as leaked when any 8
of its characters (or of its JSON-escaped form) show up.

Grepped: every dataset file, every stored dead letter (all columns of the SQLite `dlq` table), the
daemon's whole log, every message published on academy.> and model.> (dead letters' headers included;
the body of a message on academy.dlq.> is, by design, the rejected message as it came in, kept for
replay like the inbound stream's own copy, and is access-controlled by NATS: it is not grepped), the SSE
live feed (/api/events), /api/status, /api/dlq, /metrics and the page.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import aiohttp
import make_corpus as mc
import nats

from academyd.embedded import free_port
from fixtures.nats import NatsServer, daemon_cmd, daemon_env, db_count, lesson, publish, wait_for

POISON = 540
GOOD = 120


def _needles(rows: list[dict]) -> set[str]:
    out: set[str] = set()
    for r in rows:
        for s in r["secrets"]:
            for form in {s, json.dumps(s)[1:-1]}:
                out.update(form[i: i + 8] for i in range(max(1, len(form) - 7)))
    return out


def _leaks(blob: str, needles: set[str]) -> list[str]:
    return sorted({blob[i: i + 8] for i in range(len(blob) - 7) if blob[i: i + 8] in needles})


def _poison(i: int, text: str) -> bytes:
    form = i % 4
    if form == 0:
        return b"not json at all: " + text.encode()
    if form == 1:
        body = lesson(10_000 + i, event_id=f"poison-{i}", situation=text)
        del body["action"]  # a schema violation
        return json.dumps(body).encode()
    if form == 2:
        return json.dumps({"schema_version": 99, "event_id": f"poison-{i}", "note": text}).encode()
    return json.dumps([text, i]).encode()


async def test_datasets_built_while_poison_is_dead_lettered_leak_nothing(tmp_path: Path,
                                                                         nats_server: NatsServer) -> None:
    positives = [r for r in mc.load() if r["label"] == "secret"]
    needles = _needles(positives)
    data, log = tmp_path / "data", tmp_path / "daemon.log"
    port = free_port()
    env = daemon_env(
        ACADEMY_NATS__ACK_WAIT_S="5", ACADEMY_NATS__MAX_DELIVER="4", ACADEMY_TRAINING__AUTORUN="false",
        ACADEMY_HTTP__ENABLED="true", ACADEMY_HTTP__PORT=str(port), ACADEMY_CURATOR__MIN_EXAMPLES="5",
        ACADEMY_LOG_LEVEL="debug",
    )
    proc = subprocess.Popen(daemon_cmd("run", "--nats-url", nats_server.url, "--data-dir", str(data)), env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    published: list[tuple[str, dict[str, str], bytes]] = []
    sse: list[str] = []
    nc = await nats.connect(nats_server.url)
    base = f"http://127.0.0.1:{port}"
    try:
        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            published.append((msg.subject, dict(msg.headers or {}), msg.data))

        await nc.subscribe("academy.>", cb=on_msg)
        await nc.subscribe("model.>", cb=on_msg)
        js = nc.jetstream(timeout=10)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as http:
            for _ in range(400):
                try:
                    async with http.get(f"{base}/healthz") as r:
                        if r.status == 200 and (await r.json())["ready"]:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.05)

            async def read_feed() -> None:
                async with http.get(f"{base}/api/events") as r:
                    async for line in r.content:
                        sse.append(line.decode("utf-8", "replace"))

            feed = asyncio.create_task(read_feed())
            w = mc.Gen(5)
            for i in range(GOOD):  # good lessons carrying secrets: they reach datasets, redacted
                text = positives[i % len(positives)]["text"]
                await publish(js, "lesson.created", lesson(i, situation=f"{w.words(12)} {text}",
                                                           action=f"{w.words(14)} (case {i})"), f"ev-lesson-{i}")
            db = data / "academy.db"
            await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM lessons") == GOOD, timeout=60)

            poison_done = asyncio.Event()
            builds: list[dict] = []

            async def send_poison() -> None:
                for i in range(POISON):
                    await publish(js, "lesson.created", _poison(i, positives[i % len(positives)]["text"]),
                                  f"poison-{i}")
                    if i % 20 == 0:
                        await asyncio.sleep(0.01)  # spread over the builds, as a stream of bad input would be
                await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM dlq") >= POISON, timeout=120)
                poison_done.set()

            async def build_datasets() -> None:
                while not poison_done.is_set() or len(builds) < 3:
                    reply = await nc.request("academy.cmd.dataset", json.dumps({"reason": "race"}).encode(),
                                             timeout=120)
                    body = json.loads(reply.data)
                    assert body["ok"], body
                    builds.append({**body, "during_poison": not poison_done.is_set()})

            await asyncio.gather(send_poison(), build_datasets())
            print(f"{len(builds)} datasets built, {sum(b['during_poison'] for b in builds)} while poison was dead-lettered")
            assert sum(b["during_poison"] for b in builds) >= 3, builds
            assert db_count(db, "SELECT COUNT(*) FROM dlq") == POISON

            reads = {}
            for path in ("/api/status", f"/api/dlq?limit={POISON}", "/metrics", "/", "/api/datasets?limit=50"):
                async with http.get(base + path) as r:
                    assert r.status == 200, path
                    reads[path] = await r.text()
            await wait_for(lambda: sum('"academy.dlq.' in line for line in sse) >= 50, timeout=30)
            feed.cancel()
            # and what the streams keep (a core subscription may see a message after it was read)
            stored: list[tuple[str, dict[str, str], bytes]] = []
            for _ in range(300):  # the dead letter is published after its row is committed
                if (await js.stream_info("ACADEMY_DLQ")).state.messages >= POISON:
                    break
                await asyncio.sleep(0.1)
            for stream in ("ACADEMY_DLQ", "ACADEMY_EVENTS"):
                info = await js.stream_info(stream)
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    m = await js.get_msg(stream, seq)
                    stored.append((m.subject, dict(m.headers or {}), m.data or b""))
    finally:
        await nc.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    # the race was really run: datasets were written while dead letters arrived, and they hold the
    # redacted remains of the planted secrets
    files = sorted(p for p in (data / "training").rglob("*") if p.is_file())
    datasets = [p for p in files if p.name.startswith("dataset_") and p.suffix == ".jsonl"]
    assert len(datasets) >= 3
    assert all("<REDACTED>" in p.read_text() for p in datasets)

    leaks: dict[str, list[str]] = {}
    for p in files:
        leaks[str(p.relative_to(data))] = _leaks(p.read_text(encoding="utf-8", errors="replace"), needles)
    import sqlite3

    conn = sqlite3.connect(f"file:{data / 'academy.db'}?mode=ro", uri=True)
    rows = conn.execute("SELECT * FROM dlq").fetchall()
    conn.close()
    assert len(rows) == POISON
    leaks["sqlite dlq"] = _leaks(json.dumps(rows, ensure_ascii=False), needles)
    leaks["sqlite dlq (ascii)"] = _leaks(json.dumps(rows), needles)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "event_dead_lettered" in text and "dataset" in text
    leaks["daemon log"] = _leaks(text, needles)
    dlq_msgs = [m for m in published + stored if m[0].startswith("academy.dlq.")]
    assert sum(m[0].startswith("academy.dlq.") for m in stored) == POISON
    events = [m for m in published + stored if not m[0].startswith("academy.dlq.")]
    assert any(s == "academy.dataset.built" for s, _, _ in events)
    leaks["published events"] = _leaks("\n".join(f"{s} {h} {d.decode('utf-8', 'replace')}" for s, h, d in events),
                                       needles)
    leaks["dead-letter headers"] = _leaks("\n".join(json.dumps(h) for _, h, _ in dlq_msgs), needles)
    assert sum('"academy.dlq.' in line for line in sse) >= 50 and any("dataset.built" in line for line in sse)
    leaks["SSE /api/events"] = _leaks("".join(sse), needles)
    for path, body in reads.items():
        leaks[path] = _leaks(body, needles)
    assert {k: v for k, v in leaks.items() if v} == {}
