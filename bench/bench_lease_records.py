"""What trust per worker costs the lease (academyd.worker.trust): a run's lease is a sequence of records
judged in order instead of one KV key. On one local nats-server, `--n` of each:

    PYTHONPATH=. .venv/bin/python bench/bench_lease_records.py [--n 200]

- a record written (the compare-and-swap over all of a run's keys);
- the first read of a run by a fresh reader (it walks the retained records, at most 64 per writer);
- every later read (one last-message lookup when nothing is new: what the daemon does every poll per run),
  against a plain KV get of one key (the baseline: what a read cost before).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time

import nats

from academyd.embedded import find_server_binary, free_port
from academyd.settings import load_settings
from academyd.worker.protocol import Lease, Wire


async def main(n: int) -> None:
    store, port = tempfile.mkdtemp(), free_port()
    server = subprocess.Popen([str(find_server_binary()), "-js", "-p", str(port), "-sd", store],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        settings = load_settings(None, data_dir=store, nats={"url": "unused"}, workers={"ack_wait_s": 60})
        wire = await Wire.open(nc.jetstream(timeout=5), settings, create=True)
        lease, rev = Lease.build(run_id="r", worker="w1", state="training", attempt=1), 0
        t0 = time.perf_counter()
        for i in range(n):
            rev = await wire.write_lease("r", "w1", lease.changed(beat=float(i)), last=rev)
        write_ms = (time.perf_counter() - t0) / n * 1000
        fresh = Wire(js=wire.js, settings=settings, artifacts=wire.artifacts, workers=wire.workers, leases=wire.leases)
        t0 = time.perf_counter()
        await fresh.lease("r")
        cold_ms = (time.perf_counter() - t0) * 1000

        async def timed(call: object) -> float:
            xs = []
            for _ in range(n):
                t = time.perf_counter()
                await call()  # type: ignore[operator]
                xs.append((time.perf_counter() - t) * 1000)
            return statistics.median(xs)

        warm_ms = await timed(lambda: fresh.lease("r"))
        kv_ms = await timed(lambda: wire.leases.get("r.w1"))
        print(f"record written: {write_ms:.2f} ms; first read of a run (retained records walked): {cold_ms:.1f} ms; "
              f"later reads: median {warm_ms:.2f} ms; a plain KV get (baseline): median {kv_ms:.2f} ms "
              f"({warm_ms / kv_ms:.2f}x)")
        await nc.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    asyncio.run(main(ap.parse_args().n))
