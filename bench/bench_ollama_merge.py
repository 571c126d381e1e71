"""`model.promoted` -> serving on Ollama from 0.34.1 (the merged path) against the llama.cpp endpoint, one run.

    .venv/bin/python bench/bench_ollama_merge.py [--rounds 2] [--threads 1] [--adapters DIR] [--json OUT]

A real nats-server, the follower (in this process) and a GGUF LoRA trained on SmolLM2-135M-Instruct
(tests/fixtures/build_follower_adapters.py, or --adapters DIR from an earlier run of this bench or of
bench_follower.py). Each round publishes `model.promoted` for a fresh version id and waits for
`model.deployed` (verified, staged, probed, switched):

- baseline: `follower.target = llamacpp`, the endpoint the follower starts (the adapter loaded into the
  running model: llama.cpp's adapter API);
- merged Ollama: `follower.target = ollama` against the Ollama stand-in of tests/fixtures/ollama.py at
  0.34.1 (it refuses adapter models; its chat is real llama.cpp on the model it was given, loaded on first
  use as Ollama loads a model): the merge of SmolLM2 with the adapter as Q8_0 in the trainer's interpreter,
  the upload of the merged GGUF, `POST /api/create`, the probe, the alias moved.

Prints per round the seconds to `model.deployed` and the follower's timings, the merge's own figures
(tensors merged, seconds per tensor and per million parameters), the ratio merged Ollama / llama.cpp, and an
estimate of the merge for a 1.5 B base (Qwen2.5-1.5B: 28 blocks, hidden 1536, kv 256, ffn 8960; LoRA on
q,k,v,o,gate,up,down, the Academy's default targets: 196 tensors, 1.31 G parameters) from the measured rate
per parameter (and, for comparison, per tensor). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_follower import build_adapters, smollm2, trainer_python  # noqa: E402
from fixtures.follower import Outcomes, install_version, publish_event  # noqa: E402
from fixtures.nats import NatsServer  # noqa: E402
from fixtures.ollama import start_ollama_api, stop_ollama_api  # noqa: E402

# Qwen2.5-1.5B-Instruct's shapes: (rows, cols) of each adapted weight in one block.
BIG_BLOCKS = 28
BIG_SHAPES = {"q": (1536, 1536), "k": (256, 1536), "v": (256, 1536), "o": (1536, 1536),
              "gate": (8960, 1536), "up": (8960, 1536), "down": (1536, 8960)}


def big_estimate(per_tensor_s: float, per_mparam_s: float) -> dict[str, float]:
    tensors = BIG_BLOCKS * len(BIG_SHAPES)
    params = BIG_BLOCKS * sum(r * c for r, c in BIG_SHAPES.values())
    return {"tensors": tensors, "params_g": round(params / 1e9, 3),
            "by_params_s": round(per_mparam_s * params / 1e6, 1), "by_tensors_s": round(per_tensor_s * tensors, 1)}


async def rounds_of(settings: Any, server: NatsServer, built: dict[str, Any], n: int, tag: str) -> list[dict[str, Any]]:
    import nats

    from academyd.follower import Follower

    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    await asyncio.wait_for(follower.ready.wait(), 180)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    out = []
    try:
        for i in range(n):
            version = f"v{i + 1}"
            promoted = install_version(settings.data_dir, version, Path(built["good"]))
            t = time.monotonic()
            await publish_event(js, "model.promoted", promoted)
            subject, outcome = await outcomes.wait(promoted["event_id"], timeout=900)
            took = time.monotonic() - t
            if subject != "model.deployed":
                raise SystemExit(f"{tag} {version}: {subject}: {outcome.get('reason')}: {outcome.get('detail')}")
            out.append({"path": tag, "version": version, "promoted_to_deployed_s": round(took, 3),
                        "timings": outcome.get("timings"), "merge": (outcome.get("checks") or {}).get("merge")})
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await nc.close()
    return out


async def run(a: argparse.Namespace) -> dict[str, Any]:
    from academyd.settings import load_settings

    base = smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ollama-merge-"))
    built = json.loads((a.adapters / "built.json").read_text()) if a.adapters else build_adapters(base, tmp / "adapters")
    if not a.adapters:
        (tmp / "adapters" / "built.json").write_text(json.dumps(built))
    common = {"log_level": "warning", "http": {"enabled": False},
              "training": {"trainer_python": str(trainer_python())}}
    server = NatsServer(tmp / "nats-llamacpp")  # one server per path: neither follower sees the other's events
    server.start()
    try:
        llamacpp = load_settings(None, data_dir=tmp / "data-llamacpp", **common, nats={"url": server.url}, follower={
            "target": "llamacpp", "base_gguf": base, "runtime_python": trainer_python(), "port": 0,
            "threads": a.threads})
        baseline = await rounds_of(llamacpp, server, built, a.rounds, "llamacpp")
    finally:
        server.stop()
    server = NatsServer(tmp / "nats-ollama")
    server.start()
    api, runner = await start_ollama_api(version="0.34.1", base_name="smollm2:135m", base_gguf=base,
                                         llama_python=trainer_python())
    try:
        ollama = load_settings(None, data_dir=tmp / "data-ollama", **common, nats={"url": server.url}, follower={
            "target": "ollama", "ollama_url": api.url, "ollama_base": "smollm2:135m", "base_gguf": base})
        merged = await rounds_of(ollama, server, built, a.rounds, "ollama-merged")
    finally:
        await stop_ollama_api(api, runner)
        server.stop()
    merges = [r["merge"] for r in merged if r.get("merge") and "merge_s" in r["merge"]]
    per_tensor = statistics.median(m["per_tensor_s"] for m in merges)
    per_mparam = statistics.median(m["per_mparam_s"] for m in merges)
    base_s = statistics.median(r["promoted_to_deployed_s"] for r in baseline)
    merged_s = statistics.median(r["promoted_to_deployed_s"] for r in merged)
    summary = {
        "rounds": a.rounds, "threads": a.threads,
        "llamacpp_promoted_to_deployed_s_median": base_s,
        "ollama_merged_promoted_to_deployed_s_median": merged_s,
        "ratio_ollama_merged_over_llamacpp": round(merged_s / base_s, 2),
        "merge_tensors": merges[0]["merged"], "merge_params_m": round(merges[0]["params_merged"] / 1e6, 1),
        "merge_s_median": statistics.median(m["merge_s"] for m in merges),
        "merge_total_s_median": statistics.median(m["total_s"] for m in merges),
        "merge_per_tensor_ms": round(per_tensor * 1e3, 2), "merge_per_mparam_ms": round(per_mparam * 1e3, 2),
        "estimate_1_5b": big_estimate(per_tensor, per_mparam),
    }
    return {"summary": summary, "rounds": baseline + merged}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the endpoint")
    p.add_argument("--adapters", type=Path, help="a directory an earlier run built (skips training)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = asyncio.run(run(a))
    for r in result["rounds"]:
        m = r.get("merge") or {}
        extra = (f"  merge {m['merge_s']:.2f} s of {m['total_s']:.2f} s ({m['merged']} tensors)"
                 if "merge_s" in m else "")
        print(f"{r['path']:<14} {r['version']:<3} promoted -> deployed {r['promoted_to_deployed_s']:>7.2f} s  "
              f"{json.dumps({k: round(v, 2) for k, v in (r['timings'] or {}).items()})}{extra}")
    print(json.dumps(result["summary"], indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
