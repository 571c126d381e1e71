"""`academyd follow` as a user runs it: a process, flags, a real nats-server, SIGTERM to stop.

The runtime is the Venom stand-in (tests/fixtures/venom.py): Venom cannot run on these machines.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from fixtures.follower import QUESTION, Outcomes, make_version, publish_event
from fixtures.nats import daemon_cmd, daemon_env
from fixtures.venom import BASE_MODEL_ID, VenomStandIn


async def test_academyd_follow_deploys_and_stops_cleanly(
        tmp_path: Path, nats_server: Any, served_base: tuple[Path, dict[str, str]], venom: VenomStandIn,
        nc: Any) -> None:
    import hashlib

    smollm2_gguf, base_identity = served_base
    data = tmp_path / "data"
    v1 = make_version(data, "v1", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=1)
    venom.runtime.answers_by_gguf[hashlib.sha256(Path(v1["gguf_path"]).read_bytes()).hexdigest()] = {
        QUESTION: "Ziggy the octopus."}
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    proc = subprocess.Popen(
        daemon_cmd("follow", "--data-dir", str(data), "--nats-url", nats_server.url, "--target", "venom",
                   "--venom-url", venom.url),
        env=daemon_env(ACADEMY_FOLLOWER__VENOM_CHAT_URL=venom.runtime.url + "/v1/chat/completions",
                       ACADEMY_FOLLOWER__VENOM_RUNTIME_ID="ollama", ACADEMY_FOLLOWER__VENOM_MODEL_ID=BASE_MODEL_ID,
                       ACADEMY_FOLLOWER__VENOM_BASE_MODELS=json.dumps({"smollm2-135m-instruct": BASE_MODEL_ID,
                                                                        "SmolLM2-135M-Instruct": BASE_MODEL_ID}),
                       ACADEMY_FOLLOWER__BASE_GGUF=str(smollm2_gguf)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        js = nc.jetstream()
        for _ in range(600):  # the follower has bound its durable consumer
            try:
                await js.consumer_info("ACADEMY_EVENTS", "academy-follower")
                break
            except Exception:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                await asyncio.sleep(0.05)
        await publish_event(js, "model.promoted", v1)
        subject, deployed = await outcomes.wait(v1["event_id"], timeout=60)
        assert subject == "model.deployed" and deployed["serving"] == "v1", (deployed.get("reason"), deployed.get("detail"))
        assert venom.active == "v1" and venom.chat_model == "venom-adapter-v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert (data / "follower" / "state-venom.json").is_file()
