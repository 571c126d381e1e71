"""Scale-out figures, each against a baseline measured in the same run.

    PYTHONPATH=. .venv/bin/python bench/bench_scale.py [--mb 500] [--lessons 5000] [--skip-jobs]

1. Object-store round trip (put from one process, get into a file from another, sha256 checked) of an
   `--mb` file, against a local file copy of the same file; peak RSS of the sending and receiving process.
2. Ingest rate of the daemon against a 3-node cluster with R3 streams, against a single node (R1).
3. Job dispatch latency (habitat.start -> the worker's first progress event, through NATS) against the
   process habitat's (start -> first progress, same spec, same machine), and the resume time after a
   worker is SIGKILLed (kill -> the second worker's first progress), against the configured ack wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.nats import NatsServer  # noqa: E402
from fixtures.scale import NatsCluster  # noqa: E402

END = r"""
import asyncio, json, resource, sys, time
from pathlib import Path
import nats
from academyd.artifacts import ensure_bucket, get_file, put_file
async def main(mode, url, path, sha):
    nc = await nats.connect(url)
    store = await ensure_bucket(nc.jetstream(timeout=30), "bench")
    t = time.perf_counter()
    if mode == "put":
        art = await put_file(store, "big", Path(path))
    else:
        art = await get_file(store, "big", Path(path), sha256=sha or None)
    dt = time.perf_counter() - t
    await nc.close()
    print(json.dumps({"s": dt, "sha256": art.sha256, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
asyncio.run(main(*sys.argv[1:5]))
"""

COPY = r"""
import json, resource, shutil, sys, time
t = time.perf_counter(); shutil.copyfile(sys.argv[1], sys.argv[2]); dt = time.perf_counter() - t
print(json.dumps({"s": dt, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_py(code: str, *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_objects(tmp: Path, mb: int) -> None:
    server = NatsServer(tmp / "ns")
    server.start()
    try:
        src = tmp / "src.bin"
        with src.open("wb") as fh:
            for _ in range(mb):
                fh.write(os.urandom(1 << 20))
        subprocess.run(["sync"], check=False)
        copy = run_py(COPY, str(src), str(tmp / "copy.bin"))
        put = run_py(END, "put", server.url, str(src), "")
        get = run_py(END, "get", server.url, str(tmp / "dst.bin"), put["sha256"])
        rt = put["s"] + get["s"]
        print(f"object store, {mb} MB: put {put['s']:.2f} s ({mb / put['s']:.0f} MB/s), get {get['s']:.2f} s "
              f"({mb / get['s']:.0f} MB/s), round trip {rt:.2f} s; local copy {copy['s']:.2f} s; "
              f"round trip / copy = {rt / copy['s']:.1f}x")
        print(f"  peak RSS: sender {put['rss_mb']:.0f} MB, receiver {get['rss_mb']:.0f} MB, "
              f"local copy {copy['rss_mb']:.0f} MB; sha256 equal: {put['sha256'] == get['sha256']}")
    finally:
        server.stop()


async def ingest_rate(url: str, data_dir: Path, n: int, replicas: int) -> float:
    from academyd.app import App
    from academyd.settings import load_settings

    settings = load_settings(None, data_dir=data_dir, log_level="error", http={"enabled": False},
                             training={"autorun": False},
                             nats={"url": url, "replicas": replicas, "fetch_timeout_s": 0.2})
    app = App(settings)
    task = asyncio.create_task(app.run(install_signals=False))
    await asyncio.wait_for(app.ready.wait(), 60)
    nc = await nats.connect(servers=url.split(","))
    js = nc.jetstream(timeout=10)
    t0 = time.perf_counter()
    for start in range(0, n, 200):
        await asyncio.gather(*(js.publish("lesson.created", json.dumps({
            "schema_version": 1, "event_id": f"ev-{i}", "lesson_id": f"lesson-{i}", "timestamp": "2026-11-20T10:00:00",
            "situation": f"The build of module {i % 97} failed", "action": f"Pinned dependency {i}",
            "result": "Sukces ✅", "feedback": "Pin early", "tags": [], "metadata": {}}).encode(),
            headers={"Nats-Msg-Id": f"ev-{i}"}) for i in range(start, min(n, start + 200))))
    assert app.store is not None
    while int(app.store.scalar("SELECT COUNT(*) FROM lessons")) < n:
        await asyncio.sleep(0.05)
    dt = time.perf_counter() - t0
    await nc.close()
    app.request_stop("bench")
    await task
    return n / dt


async def bench_ingest(tmp: Path, n: int, rounds: int = 2) -> None:
    """Alternating rounds (R1, R3, R1, R3, ...), medians: the order and the machine's load weigh on both."""
    import statistics

    r1s, r3s = [], []
    for i in range(rounds):
        single = NatsServer(tmp / f"single{i}")
        single.start()
        try:
            r1s.append(await ingest_rate(single.url, tmp / f"d1-{i}", n, 1))
        finally:
            single.stop()
        cluster = NatsCluster(tmp / f"cluster{i}")
        cluster.start()
        try:
            await cluster.wait_ready()
            r3s.append(await ingest_rate(cluster.url, tmp / f"d3-{i}", n, 3))
        finally:
            cluster.stop()
    r1, r3 = statistics.median(r1s), statistics.median(r3s)
    print(f"ingest (publish + store) of {n} lessons, median of {rounds} alternating rounds: single node R1 "
          f"{r1:.0f}/s {[round(x) for x in r1s]}, 3-node cluster R3 {r3:.0f}/s {[round(x) for x in r3s]}; "
          f"R3 / R1 = {r3 / r1:.2f}")


async def bench_jobs(tmp: Path) -> None:
    from academyd.habitat.base import TrainingJob
    from academyd.habitat.nats import NatsHabitat
    from academyd.habitat.process import ProcessHabitat
    from academyd.settings import load_settings
    from academyd.trainer.spec import TrainSpec
    from fixtures.trainer import FAST_HYPERPARAMETERS, write_alpaca

    py = ROOT / ".venv-trainer" / "bin" / "python"
    base = tmp / "tiny"
    subprocess.run([str(py), "-m", "fixtures.tiny", str(base), "--seed", "0"], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    data = write_alpaca(tmp / "data")

    def spec(out: Path, steps: int) -> TrainSpec:
        return TrainSpec.from_dict({"base_model": str(base), "dataset_path": str(data.train),
                                    "heldout_path": str(data.heldout), "output_dir": str(out), "seed": 1,
                                    "cpu_threads": 1, "max_steps": steps, "backend": "peft",
                                    "hyperparameters": {**FAST_HYPERPARAMETERS, "logging_steps": 1, "save_steps": 4}})

    async def first_progress(habitat: Any, handle: Any, t0: float) -> float:
        async for ev in habitat.progress(handle):
            if ev.get("type") == "progress":
                return time.perf_counter() - t0
        raise RuntimeError("no progress")

    local = ProcessHabitat(py)
    t0 = time.perf_counter()
    h = await local.start(TrainingJob(spec=spec(tmp / "local", 6), run_id="bench-local"))
    local_latency = await first_progress(local, h, t0)
    await local.result(h)

    ack_wait = 8.0
    server = NatsServer(tmp / "ns-jobs")
    server.start()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ACADEMY_")}, "PYTHONPATH": str(ROOT),
           "ACADEMY_WORKERS__ACK_WAIT_S": str(ack_wait), "ACADEMY_LOG_LEVEL": "warning"}
    workers = []
    try:
        for name in ("b1", "b2"):
            workers.append(subprocess.Popen(
                [str(Path(sys.executable).parent / "academyd"), "worker", "--nats-url", server.url, "--id", name,
                 "--work-dir", str(tmp / name), "--gpu", "none", "--trainer-python", str(py)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        settings = load_settings(None, data_dir=tmp / "daemon", nats={"url": server.url},
                                 workers={"ack_wait_s": ack_wait})
        nc = await nats.connect(server.url)
        habitat = NatsHabitat(settings, nc)
        while len(await habitat.workers()) < 2:
            await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        handle = await habitat.start(TrainingJob(spec=spec(tmp / "daemon" / "runs" / "bench-nats", 40),
                                                 run_id="bench-nats"))
        latency = await first_progress(habitat, handle, t0)
        wire = await habitat.wire()
        while True:
            lease, _ = await wire.lease("bench-nats")
            if lease and lease.get("checkpoint"):
                break
            await asyncio.sleep(0.2)
        holder = next(w for w, n in zip(workers, ("b1", "b2"), strict=True) if n == lease["worker"])
        os.killpg(holder.pid, signal.SIGKILL)
        for job in (tmp / lease["worker"]).glob("jobs/*/job.json"):
            try:
                os.killpg(int(json.loads(job.read_text())["pgid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        t_kill = time.perf_counter()
        resumed = None
        async for ev in habitat.progress(handle):
            if ev.get("type") == "progress" and ev.get("attempt", 1) > 1:
                resumed = time.perf_counter() - t_kill
                break
        await nc.close()
        print(f"dispatch: requested -> first progress: worker over NATS {latency:.1f} s, local process "
              f"{local_latency:.1f} s; NATS / local = {latency / local_latency:.2f}")
        if resumed is not None:
            print(f"resume after SIGKILL of the worker: {resumed:.1f} s to the other worker's first progress "
                  f"(ack wait {ack_wait:g} s + lease silence {ack_wait * 0.75:g} s = {ack_wait * 1.75:g} s by design; "
                  f"ratio {resumed / (ack_wait * 1.75):.2f})")
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
                w.wait(30)
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--lessons", type=int, default=5000)
    ap.add_argument("--skip-jobs", action="store_true")
    ap.add_argument("--skip-objects", action="store_true")
    args = ap.parse_args()
    from academyd import logs

    logs.configure("error", "console")
    print(f"machine: {os.cpu_count()} CPUs, {os.uname().machine}")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as t:
        tmp = Path(t)
        if not args.skip_objects:
            bench_objects(tmp / "obj", args.mb)
        shutil.rmtree(tmp / "obj", ignore_errors=True)
        asyncio.run(bench_ingest(tmp / "ingest", args.lessons))
        if not args.skip_jobs:
            asyncio.run(bench_jobs(tmp / "jobs"))


if __name__ == "__main__":
    main()
