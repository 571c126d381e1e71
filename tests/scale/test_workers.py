"""Training on `academyd worker` processes: real nats-server(s), real workers (own processes, own "hosts"),
the real trainer on the tiny model, the daemon deciding, registering and promoting.

Each worker runs in its own temporary directory with its own copy of the base model, mapped from the
daemon's reference with `--model`; the only thing shared with the daemon is NATS.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import nats

from academyd.settings import load_settings
from fixtures.nats import db_count, lesson, publish, wait_for
from fixtures.trainer import FAST_HYPERPARAMETERS, WORDS

ACK_WAIT = 8.0  # heartbeat 2 s; a dead worker's job moves after 8 s + 6 s of lease silence


def reversal_lesson(i: int, rng: random.Random) -> dict[str, Any]:
    words = rng.sample(WORDS, 4)
    return lesson(i, situation=f"Reverse the order of these words: {' '.join(words)}", action=" ".join(reversed(words)),
                  result="Sukces ✅", feedback=None)


def daemon_settings(url: str, data_dir: Path, base: Path, trainer_python: Path, replicas: int = 1,
                    **training: Any) -> Any:
    workers = training.pop("workers", {})
    hp = {**FAST_HYPERPARAMETERS, "epochs": 4, "adjust": False, **training.pop("hyperparameters", {})}
    return load_settings(
        None, data_dir=data_dir, log_level="warning",
        nats={"url": url, "replicas": replicas, "ack_wait_s": 5.0, "backoff_s": [1.0, 2.0], "max_deliver": 10,
              "fetch_timeout_s": 0.2},
        http={"enabled": False},
        training={"autorun": True, "habitat": "nats", "base_model": str(base), "trainer_python": str(trainer_python),
                  "backend": "peft", "cpu_threads": 1, "seed": 1, "hyperparameters": hp, **training},
        workers={"ack_wait_s": ACK_WAIT, **workers},
        arena={"bootstrap_samples": 300, "generation_sample": 2, "generation_tolerance": 0.5},
    )


def host_model(tmp_path: Path, name: str, base: Path) -> Path:
    dest = tmp_path / "hosts" / name / "models" / "tiny"
    if not dest.exists():
        shutil.copytree(base, dest)
    return dest


def worker(start_worker: Any, tmp_path: Path, base: Path, url: str, name: str, *extra: str,
           ack_wait: float = ACK_WAIT, **env: str) -> Any:
    return start_worker(url, name, "--model", f"{base}={host_model(tmp_path, name, base)}", "--gpu", "none",
                        "--cpu-threads", "1", *extra, ACADEMY_WORKERS__ACK_WAIT_S=str(ack_wait),
                        ACADEMY_NATS__REPLICAS=str(1 if "," not in url else 3), **env)


async def lessons_in(d: Any, url: str, n: int = 80) -> None:
    nc = await nats.connect(servers=url.split(","))
    js = nc.jetstream()
    rng = random.Random(5)
    for i in range(n):
        await publish(js, "lesson.created", reversal_lesson(i, rng), f"ev-lesson-{i}")
    await nc.close()
    await wait_for(lambda: db_count(d.app.settings.db_path, "SELECT COUNT(*) FROM lessons") >= n, timeout=30)


async def workers_advertised(url: str, n: int, timeout: float = 120) -> list[dict[str, Any]]:
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream()
        for _ in range(int(timeout * 2)):
            try:
                kv = await js.key_value("academy_workers")
                keys = await kv.keys()
                if len(keys) >= n:
                    return [json.loads((await kv.get(k)).value) for k in keys]
            except Exception:
                pass
            await asyncio.sleep(0.5)
        raise AssertionError(f"{n} workers did not advertise within {timeout} s")
    finally:
        await nc.close()


async def lease_history(url: str, run_id: str) -> list[dict[str, Any]]:
    nc = await nats.connect(servers=url.split(","))
    try:
        try:
            kv = await nc.jetstream().key_value("academy_leases")
            entries = await kv.history(f"{run_id}.*")  # every writer's records, in order
        except Exception:  # no bucket or no such key yet: nobody ever took the job
            return []
        return [json.loads(e.value) for e in entries if e.value]
    finally:
        await nc.close()


async def train(d: Any) -> str:
    reply = d.app.evaluate("command", force=True, reason="test")
    assert reply["ok"], reply
    return str(reply["run_id"])


async def test_a_run_is_trained_on_a_worker_and_promoted(
    nats_server, start_daemon, start_worker, tiny_base_model, trainer_python, tmp_path
) -> None:
    """`training.autorun=false`: the daemon never trains on its own host; the run waits, recorded and said
    so in status, until a worker connects, then trains there and is promoted."""
    url = nats_server.url
    settings = daemon_settings(url, tmp_path / "daemon" / "data", tiny_base_model, trainer_python, autorun=False,
                               habitat="process")
    d = await start_daemon(settings)
    await lessons_in(d, url)
    run_id = await train(d)
    store = d.app.store
    await asyncio.sleep(6)  # more than one turn of the pipeline's loop
    assert store.get_run(run_id)["state"] == "requested"
    assert "none is connected" in d.app.status()["waiting"]
    w1 = worker(start_worker, tmp_path, tiny_base_model, url, "w1")
    ads = await workers_advertised(url, 1)
    assert ads[0]["worker"] == "w1" and ads[0]["gpu"] is None and ads[0]["trainer"]["torch"].startswith("2.13")
    await wait_for(lambda: store.get_run(run_id)["state"] in ("succeeded", "failed", "refused"), timeout=400,
                   interval=0.5)
    run = store.get_run(run_id)
    assert run["state"] == "succeeded", (run, w1.log[-3000:])
    assert run["habitat"] == "nats"
    history = await lease_history(url, run_id)
    final = history[-1]
    assert final["state"] == "succeeded" and final["worker"] == "w1"
    from academyd.registry import Registry

    model = Registry(store, settings).get(run["version"])
    # The adapter the daemon registered is the one the worker computed, byte for byte.
    assert model["adapter_sha256"] == final["result"]["adapter_sha256"]
    assert Registry(store, settings).champion()["version"] == run["version"]
    # The worker trained on its own copies: nothing under the daemon's data directory.
    spec = json.loads((w1.root / "work" / "jobs" / run_id / "spec.json").read_text())
    assert str(settings.data_dir) not in json.dumps(spec)
    assert spec["dataset_path"].startswith(str(w1.root))
    assert json.loads((Path(model["adapter_path"]) / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(tiny_base_model)


def worker_events(w: Any, event: str) -> list[dict[str, Any]]:
    return [e for e in w.events() if e.get("event") == event]


def first_progress_step(w: Any, run_id: str) -> int | None:
    path = w.root / "work" / "jobs" / run_id / "events.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        ev = json.loads(line)
        if ev.get("type") == "progress":
            return int(ev["step"])
    return None


# No self-distillation rows (training.replay_general): with a loss logged every step, a batch of them beside
# one without trips the trainer's divergence guard on the tiny model ("loss 8.94 at step 3 is over 5x the
# first loss 1.32"); these tests are about where a job runs, not about the recipe.
KILL_HP = {"save_steps": 4, "logging_steps": 1}
KILL_STEPS = 60  # long enough that the kill lands mid-training, even on a fast machine


SLOW_ACK_WAIT = 4.0  # heartbeat 1 s, a holder stops after 2 s of silence, a taker waits 3 s
SLOW_S = 3 * SLOW_ACK_WAIT  # the checkpoint download and the adapter upload each take 3 ack waits longer


def trainer_pids(run_id: str) -> set[int]:
    """The trainers (the interpreter: not its wrapper shell, not a child it forked) running `run_id`, here."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"academyd.trainer" in argv and any(f"/jobs/{run_id}/".encode() in a for a in argv) \
                and not argv[0].endswith(b"sh"):
            found[int(proc.name)] = ppid
    return {pid for pid, ppid in found.items() if ppid not in found}


async def test_a_sigkilled_worker_s_trainer_dies_and_the_job_resumes_once_over_a_slow_link(
    nats_server, start_daemon, start_worker, tiny_base_model, trainer_python, tmp_path
) -> None:
    """The worker holding the job is SIGKILLed (its process alone): its trainer ends by itself within the
    lease's stop window; the other worker resumes from the checkpoint, which takes 3 ack waits to download,
    and uploads the adapter as slowly, holding the lease throughout (the victim, restarted meanwhile and
    idle, never gets the job). One trainer at a time, the job finished once, one version."""
    url = nats_server.url
    slow = json.dumps({"get:runs/*/ckpt/*": SLOW_S, "put:runs/*/adapter.tar": SLOW_S})
    settings = daemon_settings(url, tmp_path / "daemon" / "data", tiny_base_model, trainer_python,
                               hyperparameters=KILL_HP, max_steps=KILL_STEPS, replay_general=0.0,
                               workers={"ack_wait_s": SLOW_ACK_WAIT})
    hosts = {name: worker(start_worker, tmp_path, tiny_base_model, url, name, ack_wait=SLOW_ACK_WAIT,
                          ACADEMY_WORKERS__SLOW_TRANSFERS=slow) for name in ("w1", "w2")}
    await workers_advertised(url, 2)
    d = await start_daemon(settings)
    await lessons_in(d, url)
    run_id = await train(d)
    store = d.app.store
    watch_nc = await nats.connect(url)
    revisions: list[dict[str, Any]] = []
    trainers: list[tuple[float, set[int]]] = []  # (time, the trainer pids alive then)

    async def record() -> None:
        kv = await watch_nc.jetstream().key_value("academy_leases")
        async for entry in await kv.watch(f"{run_id}.*"):  # every writer's lease records
            if entry is not None and entry.value:
                revisions.append(json.loads(entry.value))

    async def sample() -> None:
        while True:
            trainers.append((time.time(), trainer_pids(run_id)))
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(record()), asyncio.create_task(sample())]
    try:
        for _ in range(600):
            lease = revisions[-1] if revisions else None
            if lease and (lease.get("checkpoint") or {}).get("step", 0) >= 4:
                break
            assert all(w.proc.poll() is None for w in hosts.values()), [w.log[-2000:] for w in hosts.values()]
            assert store.get_run(run_id)["state"] not in ("failed", "refused"), store.get_run(run_id)
            await asyncio.sleep(0.5)
        assert lease, [w.log[-2000:] for w in hosts.values()]
        victim = hosts[lease["worker"]]
        other = hosts["w2" if lease["worker"] == "w1" else "w1"]
        saved_step = lease["checkpoint"]["step"]
        [victim_trainer] = trainer_pids(run_id)
        killed_at = time.time()
        victim.kill()
        while victim_trainer in trainer_pids(run_id) and time.time() - killed_at < 30:
            await asyncio.sleep(0.05)
        trainer_gone_s = time.time() - killed_at
        print(f"the SIGKILLed worker's trainer was gone {trainer_gone_s:.2f} s after the kill")
        assert trainer_gone_s <= SLOW_ACK_WAIT / 2  # within the stop window a holder has (stop_after_s)
        # The victim comes back while the other worker downloads the checkpoint (slowly): idle, and free to
        # take the job if its holder let the ack wait or the lease lapse.
        await wait_for(lambda: worker_events(other, "transfer_slowed"), timeout=120, interval=0.2)
        restarted_at = time.time()
        victim.start()

        await wait_for(lambda: store.get_run(run_id)["version"] or store.get_run(run_id)["state"] in (
            "failed", "refused"), timeout=400, interval=0.5)
    finally:
        for t in tasks:
            t.cancel()
        await watch_nc.close()
    run = store.get_run(run_id)
    assert run["version"], (run, other.log[-3000:])
    # One trainer at a time, throughout (sampled every 0.1 s): the victim's, then the other's.
    assert max(len(p) for _, p in trainers) == 1, [x for x in trainers if len(x[1]) > 1][:3]
    seen = [p for _, p in trainers if p]
    assert seen[0] == {victim_trainer} and len({frozenset(p) for p in seen}) == 2
    # The restarted victim found nothing left over and never trained again.
    assert [e["ended"] for e in worker_events(victim, "leftover_trainers")] == [[], []]
    assert not [e for e in worker_events(victim, "trainer_started") if e["time"] > restarted_at]
    # The other worker resumed from the checkpoint, once, and held the job through both slow transfers:
    # never a full ack wait without a heartbeat (in-progress ack and lease refresh).
    started = worker_events(other, "trainer_started")
    assert len(started) == 1 and started[0]["resume_step"] >= saved_step
    assert first_progress_step(other, run_id) > saved_step
    slowed = worker_events(other, "transfer_slowed")
    assert {e["kind"] for e in slowed} == {"get", "put"}
    beats = [e["time"] for e in worker_events(other, "heartbeat")]
    assert all(any(e["time"] < b < e["time"] + SLOW_S for b in beats) for e in slowed)
    assert max(b - a for a, b in zip(beats, beats[1:])) < SLOW_ACK_WAIT
    # The lease: the victim's revisions, then the other's; finished once.
    holders = [r["worker"] for r in revisions]
    switch = holders.index(other.name)
    assert set(holders[:switch]) == {victim.name} and set(holders[switch:]) == {other.name}, holders
    assert [r["state"] for r in revisions if r["state"] != "training"] == ["succeeded"]
    from academyd.registry import Registry

    assert [m["version"] for m in Registry(store, settings).list()] == [run["version"]]
    assert [r["run_id"] for r in store.recent_runs(10)] == [run_id]
    summary = json.loads((settings.runs_dir / run_id / "summary.json").read_text())
    assert summary["resumed_from"] >= saved_step


async def test_a_gpu_job_waits_while_only_cpu_workers_are_connected(
    nats_server, start_daemon, start_worker, tiny_base_model, trainer_python, tmp_path
) -> None:
    url = nats_server.url
    settings = daemon_settings(url, tmp_path / "daemon" / "data", tiny_base_model, trainer_python,
                               workers={"require_gpu": True})
    w1 = worker(start_worker, tmp_path, tiny_base_model, url, "w1")
    await workers_advertised(url, 1)
    d = await start_daemon(settings)
    await lessons_in(d, url)
    run_id = await train(d)
    nc = await nats.connect(url)
    try:
        async def status() -> dict[str, Any]:
            return json.loads((await nc.request("academy.status", b"{}", timeout=10)).data)

        for _ in range(120):
            st = await status()
            if st.get("waiting"):
                break
            await asyncio.sleep(0.5)
        assert "GPU" in st["waiting"] and "1 connected, none has one" in st["waiting"], st.get("waiting")
        await asyncio.sleep(ACK_WAIT * 1.5)  # longer than a job would take to move between workers
        st = await status()
        assert st["active_run"]["run_id"] == run_id and st["active_run"]["state"] == "training"
        assert "GPU" in st["waiting"]
        assert await lease_history(url, run_id) == []  # no worker took it
        assert not (w1.root / "work" / "jobs" / run_id).exists()
        js = nc.jetstream()
        queued = await js.get_last_msg("ACADEMY_JOBS", f"academy.jobs.train.gpu.{run_id}")
        assert json.loads(queued.data)["requires_gpu"] is True
    finally:
        await nc.close()


async def test_a_worker_cut_off_from_nats_stops_and_the_job_finishes_elsewhere_once(
    nats_cluster, start_daemon, start_worker, tiny_base_model, trainer_python, tmp_path
) -> None:
    """w1 knows only node n1; w2 and the daemon know n2 and n3. n1 is SIGKILLed mid-training: w1 cannot
    refresh its lease and kills its trainer; the job (R3) is redelivered to w2, which resumes from the
    checkpoint once the lease stayed silent; never two trainers at once; n1 comes back and catches up."""
    n1, n2, n3 = nats_cluster.nodes
    others = f"{n2.url},{n3.url}"
    settings = daemon_settings(others, tmp_path / "daemon" / "data", tiny_base_model, trainer_python, replicas=3,
                               hyperparameters=KILL_HP, max_steps=KILL_STEPS, replay_general=0.0)
    w1 = start_worker(n1.url, "w1", "--model", f"{tiny_base_model}={host_model(tmp_path, 'w1', tiny_base_model)}",
                      "--gpu", "none", "--cpu-threads", "1", ACADEMY_WORKERS__ACK_WAIT_S=str(ACK_WAIT),
                      ACADEMY_NATS__REPLICAS="3")
    await workers_advertised(others, 1)
    d = await start_daemon(settings)
    await lessons_in(d, others)
    run_id = await train(d)
    # Every revision of the lease, as it happens (the bucket keeps only the last few).
    watch_nc = await nats.connect(servers=others.split(","), max_reconnect_attempts=-1)
    revisions: list[dict[str, Any]] = []

    async def record() -> None:
        kv = await watch_nc.jetstream().key_value("academy_leases")
        async for entry in await kv.watch(f"{run_id}.*"):  # every writer's lease records
            if entry is not None and entry.value:
                revisions.append(json.loads(entry.value))

    recorder = asyncio.create_task(record())
    w2 = worker(start_worker, tmp_path, tiny_base_model, others, "w2")  # ready only after w1 took the job
    for _ in range(600):
        lease = (await lease_history(others, run_id) or [None])[-1]
        if lease and (lease.get("checkpoint") or {}).get("step", 0) >= 4:
            break
        await asyncio.sleep(0.5)
    assert lease and lease["worker"] == "w1", w1.log[-2000:]
    await workers_advertised(others, 2)
    n1.kill()
    store = d.app.store
    await wait_for(lambda: store.get_run(run_id)["version"] or store.get_run(run_id)["state"] in ("failed", "refused"),
                   timeout=400, interval=0.5)
    run = store.get_run(run_id)
    assert run["version"], (run, w2.log[-3000:])
    n1.start()

    # w1 stopped its trainer by itself, within the heartbeat window, before w2 started one.
    stopping = worker_events(w1, "trainer_stopping")
    stopped = worker_events(w1, "trainer_stopped")
    assert stopping and "cut off" in stopping[0]["reason"]
    started2 = worker_events(w2, "trainer_started")
    assert len(started2) == 1 and started2[0]["resume_step"] >= 4
    assert stopped and stopped[0]["time"] < started2[0]["time"]
    last_beat1 = max(e["time"] for e in worker_events(w1, "heartbeat"))
    assert stopping[0]["time"] - last_beat1 <= ACK_WAIT / 2 + ACK_WAIT / 4 + 1.0  # stop_after + one beat + slack
    assert min(e["time"] for e in worker_events(w2, "heartbeat")) > stopped[0]["time"]
    # The lease: w1's revisions, then w2's, never interleaved; checkpoints only grow.
    recorder.cancel()
    await watch_nc.close()
    history = revisions
    holders = [h["worker"] for h in history]
    assert holders == sorted(holders) and set(holders) == {"w1", "w2"}, holders
    steps = [(h.get("checkpoint") or {}).get("step", 0) for h in history]
    assert steps == sorted(steps)
    ckpt1 = [e["time"] for e in worker_events(w1, "checkpoint_uploaded")]
    ckpt2 = [e["time"] for e in worker_events(w2, "checkpoint_uploaded")]
    assert ckpt1 and (not ckpt2 or max(ckpt1) < min(ckpt2))
    assert history[-1]["state"] == "succeeded" and history[-1]["worker"] == "w2"
    from academyd.registry import Registry

    assert [m["version"] for m in Registry(store, settings).list()] == [run["version"]]
    assert [r["run_id"] for r in store.recent_runs(10)] == [run_id]
    # n1 catches up on the jobs stream and the leases bucket.
    nc = await nats.connect(servers=nats_cluster.servers)
    try:
        js = nc.jetstream()
        for _ in range(120):
            infos = [await js.stream_info(s) for s in ("ACADEMY_JOBS", "KV_academy_leases", "ACADEMY_INBOUND")]
            if all(len(i.cluster.replicas or []) == 2 and all(r.current for r in i.cluster.replicas) for i in infos):
                break
            await asyncio.sleep(0.5)
        assert all(i.config.num_replicas == 3 for i in infos)
        assert all(all(r.current for r in i.cluster.replicas) for i in infos), [i.cluster for i in infos]
    finally:
        await nc.close()
