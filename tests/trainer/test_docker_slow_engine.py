"""The Docker habitat never calls the engine on the event loop: with an engine that takes 5 s to list
containers (tests/fixtures/slow_engine.py, a Docker API stand-in over a unix socket), the daemon's loop
keeps turning (lag under 100 ms, measured as in tests/pipeline/test_champion.py) while the progress
stream, the watchdog and `status` all poll the job; their overlapping state reads share one engine call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import docker
from fixtures.slow_engine import SlowEngine, running_container

from academyd.habitat.base import JobHandle, JobStatus
from academyd.habitat.docker import DockerOptions
from academyd.habitat.docker.container import LABEL_JOB_DIR, LABEL_MANAGED, LABEL_RUN_ID
from academyd.habitat.docker.habitat import REF_PREFIX, DockerHabitat
from academyd.habitat.jobdir import JOB_FILE, JobDir, write_control

DELAY_S = 5.0


async def test_a_slow_engine_does_not_stall_the_loop(tmp_path: Path) -> None:
    jd = JobDir(tmp_path / "run")
    jd.output.mkdir(parents=True)
    ref = REF_PREFIX + str(jd.root)
    record = {"ref": ref, "run_id": "r-slow", "container_name": "academyd-r-slow", "started_at": time.time(),
              "events_offset": 0, "time_limit_s": 3600, "memory_limit_mb": None}
    write_control(jd / JOB_FILE, record)
    labels = {LABEL_MANAGED: "true", LABEL_JOB_DIR: str(jd.root), LABEL_RUN_ID: "r-slow"}
    engine = SlowEngine(tmp_path, [running_container("c0ffee" * 10 + "abcd", "academyd-r-slow", labels)], DELAY_S)
    try:
        client = await asyncio.to_thread(docker.DockerClient, base_url=engine.url, timeout=60)
        habitat = DockerHabitat(client, DockerOptions(image="academyd-habitat-test"), poll_s=0.25)
        handle = JobHandle(ref=ref, run_id="r-slow", output_dir=str(jd.root))

        lags: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.005)
                lags.append(loop.time() - t - 0.005)

        async def follow() -> None:
            async for _ in habitat.progress(handle):
                pass

        prober = asyncio.create_task(probe())
        habitat._watch(handle, record)  # the watchdog, as after a start or a re-attach
        follower = asyncio.create_task(follow())
        t0 = time.monotonic()
        status = await habitat.status(handle)  # one engine round: at least DELAY_S
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)
        stop.set()
        await prober
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await habitat.close()

        assert status is JobStatus.RUNNING
        assert took >= DELAY_S - 0.1, took  # the engine really was that slow
        lists = [r for r in engine.requests() if r == "containers/json"]
        print(f"\nslow engine ({DELAY_S:g} s a list): status took {took:.1f} s; loop lag over {len(lags)} probes: "
              f"max {max(lags) * 1000:.1f} ms, p99 {sorted(lags)[int(0.99 * (len(lags) - 1))] * 1000:.1f} ms; "
              f"{len(lists)} container lists for the progress stream, the watchdog and status")
        assert max(lags) < 0.1
        # Overlapping reads of one job share one engine call: the first round, and the next one in flight.
        assert 1 <= len(lists) <= 2, lists
    finally:
        engine.stop()
