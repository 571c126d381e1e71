"""The daemon on a real 3-node nats-server cluster (R3): a node SIGKILLed during ingest loses nothing.

Three nats-server processes with routes on loopback; the daemon is given all three URLs and
`nats.replicas = 3`. The node the daemon is connected to is SIGKILLed while 5,000 lessons are being
published, then started again: every lesson is stored exactly once, the consumer drains to zero, and
the restarted node catches up (its replica of the inbound stream is current again).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats

from academyd.settings import load_settings
from fixtures.nats import db_count, lesson, wait_for


def cluster_settings(cluster: Any, data_dir: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "log_level": "warning",
        "nats": {"url": cluster.url, "replicas": 3, "ack_wait_s": 5.0, "backoff_s": [1.0, 2.0], "max_deliver": 10,
                 "fetch_timeout_s": 0.2},
        "http": {"enabled": False},
        "training": {"autorun": False},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return load_settings(None, **base)


async def publish_all(js: Any, n: int, on_half: Any) -> None:
    """Publish lessons 0..n-1, 100 at a time; a failed publish is retried with the same Nats-Msg-Id."""
    for start in range(0, n, 100):
        if start == n // 2:
            on_half()
        pending = list(range(start, min(start + 100, n)))
        while pending:
            results = await asyncio.gather(*(
                js.publish("lesson.created", json.dumps(lesson(i)).encode(), headers={"Nats-Msg-Id": f"ev-lesson-{i}"},
                           timeout=5)
                for i in pending), return_exceptions=True)
            pending = [i for i, r in zip(pending, results, strict=True) if isinstance(r, BaseException)]
            if pending:
                await asyncio.sleep(0.3)


async def test_every_stream_is_r3_and_ingest_survives_a_node_sigkill(nats_cluster, start_daemon, tmp_path) -> None:
    settings = cluster_settings(nats_cluster, tmp_path / "data")
    d = await start_daemon(settings)
    nc = await nats.connect(servers=nats_cluster.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream(timeout=5)
        for stream in ("ACADEMY_INBOUND", "ACADEMY_EVENTS", "ACADEMY_DLQ"):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
        victim = nats_cluster.node_for(str(d.app.bus.nc.connected_url.netloc))
        await publish_all(js, 5000, victim.kill)
        assert not victim.alive
        db = settings.db_path
        await wait_for(lambda: db_count(db, "SELECT COUNT(*) FROM lessons") >= 5000, timeout=120, interval=0.5)
        victim.start()
        await wait_for(lambda: d.app.bus.nc.is_connected, timeout=20)

        async def drained() -> bool:
            lag = await d.app.bus.consumer_lag()
            return lag == 0

        for _ in range(200):
            if await drained():
                break
            await asyncio.sleep(0.25)
        assert await drained()
        assert db_count(db, "SELECT COUNT(*) FROM lessons") == 5000
        assert db_count(db, "SELECT COUNT(DISTINCT lesson_id) FROM lessons") == 5000

        # The restarted node caught up: every replica of the inbound stream is current.
        for _ in range(120):
            info = await js.stream_info("ACADEMY_INBOUND")
            replicas = info.cluster.replicas or []
            if len(replicas) == 2 and all(r.current for r in replicas) and info.state.messages == 5000:
                break
            await asyncio.sleep(0.25)
        assert info.state.messages == 5000
        assert len(replicas) == 2 and all(r.current for r in replicas), replicas
    finally:
        await nc.close()
