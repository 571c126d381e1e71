"""Object-store transfers on a real 3-node cluster while the bucket's stream leader is SIGKILLed and
started again: every download arrives (sha256 checked); the 503s / timeouts of the election are retried
(academyd.artifacts.retrying), none ends a transfer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import nats
from structlog.testing import capture_logs

from academyd.artifacts import ensure_bucket, get_file, put_file

DOWNLOADS = 500
PARALLEL = 8


async def test_downloads_survive_a_node_restart(nats_cluster, tmp_path: Path) -> None:
    nc = await nats.connect(servers=nats_cluster.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream(timeout=5)
        store = await ensure_bucket(js, "t_cluster", replicas=3)
        sent = []
        for i, size in enumerate((1_000, 200_000, 1_500_000)):  # one chunk, a few, a dozen
            src = tmp_path / f"src{i}.bin"
            src.write_bytes(os.urandom(size))
            sent.append(await put_file(store, f"runs/r1/obj{i}", src))
        info = await js.stream_info("OBJ_t_cluster")
        leader = next(n for n in nats_cluster.nodes if n.name == info.cluster.leader)

        done: list[float] = []
        failed: list[str] = []
        queue = list(range(DOWNLOADS))

        async def downloader(k: int) -> None:
            while queue:
                i = queue.pop()
                art = sent[i % len(sent)]
                try:
                    got = await get_file(store, art.name, tmp_path / "out" / f"{k}.bin", sha256=art.sha256)
                    assert got.size == art.size
                    done.append(time.monotonic())
                except Exception as exc:
                    failed.append(f"{type(exc).__name__}: {exc}")

        async def restart() -> None:
            while len(done) < DOWNLOADS // 5:
                await asyncio.sleep(0.05)
            leader.kill()  # mid-transfer: chunks in flight from the leader, no goodbye
            await asyncio.sleep(2.0)
            leader.start()

        with capture_logs() as logs:
            t0 = time.monotonic()
            await asyncio.gather(restart(), *(downloader(k) for k in range(PARALLEL)))
            elapsed = time.monotonic() - t0
        retried = [e for e in logs if e["event"] == "artifact_transfer_retry"]
        print(f"{len(done)} downloads in {elapsed:.1f} s across a leader restart, {len(retried)} retried attempts: "
              f"{sorted({e['error'].split(':')[0] for e in retried})}")
        assert failed == [], failed[:5]
        assert len(done) == DOWNLOADS
        # The restart happened while downloads ran: some finished after the node was back.
        assert leader.alive and done[-1] > done[DOWNLOADS // 5]
    finally:
        await nc.close()
