"""Progress events: through the outbox (SQLite, fsync, then JetStream) or straight to core NATS?

Measures, in the same run on a real nats-server (sync_interval: always) and a real SQLite file
(WAL, synchronous=FULL):
  - outbox: queue one progress event in its own transaction (what the pipeline does) + the relay's publish
    to JetStream and its mark;
  - core: one core NATS publish (fire and forget) + flush.
Prints per-event milliseconds, the ratio, and the CPU share at the shipped throttle (2 events/s).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats  # noqa: E402

from academyd import logs  # noqa: E402
from academyd.embedded import find_server_binary, free_port, render_config  # noqa: E402
from academyd.outbox import OutboxRelay  # noqa: E402
from academyd.store import Store  # noqa: E402

N = 300
ROUNDS = 5


def progress(i: int) -> dict[str, object]:
    return {"schema_version": 1, "event_id": f"run-x-progress-{i}", "at": "2026-11-25T12:00:00+00:00",
            "run_id": "run-x", "step": i, "total_steps": 10_000, "loss": 2.5, "learning_rate": 2e-4}


async def main() -> None:
    logs.configure("warning", "console")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        conf = root / "nats.conf"
        conf.write_text(render_config(root / "js", port))
        server = subprocess.Popen([str(find_server_binary()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT)
        try:
            await asyncio.sleep(0.5)
            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            js = nc.jetstream()
            await js.add_stream(name="EV", subjects=["academy.>"])
            store = Store.open(root / "academy.db")

            async def publish(subject: str, data: bytes, msg_id: str) -> None:
                await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})

            relay = OutboxRelay(store, publish, lambda: datetime.now(UTC))
            outbox_ms, core_ms, outbox_cpu, core_cpu = [], [], [], []
            seq = 0
            for _ in range(ROUNDS):
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(N):
                    seq += 1
                    with store.transaction():
                        store.outbox_add("academy.training.progress", progress(seq), msg_id=f"p-{seq}",
                                         now=datetime.now(UTC))
                    await relay.flush()
                outbox_ms.append((time.perf_counter() - t0) / N * 1000)
                outbox_cpu.append((time.process_time() - c0) / N * 1000)
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(N):
                    seq += 1
                    import json

                    await nc.publish("academy.training.progress", json.dumps(progress(seq)).encode())
                    await nc.flush()
                core_ms.append((time.perf_counter() - t0) / N * 1000)
                core_cpu.append((time.process_time() - c0) / N * 1000)
            o, c = statistics.median(outbox_ms), statistics.median(core_ms)
            oc, cc = statistics.median(outbox_cpu), statistics.median(core_cpu)
            print(f"outbox (transaction + JetStream publish + mark): {o:.3f} ms/event wall, {oc:.3f} ms daemon CPU "
                  f"(median of {ROUNDS} x {N})")
            print(f"core NATS publish + flush:                      {c:.3f} ms/event wall, {cc:.3f} ms daemon CPU")
            print(f"ratio outbox/core: {o / c:.1f}x wall, {oc / cc:.1f}x CPU; at 2 events/s the outbox costs "
                  f"{oc * 2 / 10:.2f}% of one core in the daemon and {o * 2 / 10:.2f}% of wall time")
            await nc.close()
            store.close()
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    asyncio.run(main())
