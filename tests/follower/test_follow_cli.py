"""`academyd follow` as a user runs it: a process, flags, a real nats-server, SIGTERM to stop.

The runtime is the Venom stand-in (tests/fixtures/follower.py): Venom cannot run on these machines.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import Any

from fixtures.follower import QUESTION, Outcomes, make_version, publish_event
from fixtures.nats import daemon_cmd, daemon_env


async def test_academyd_follow_deploys_and_stops_cleanly(
        tmp_path: Path, nats_server: Any, smollm2_gguf: Path, base_identity: dict[str, str], venom_standin: Any,
        nc: Any) -> None:
    data = tmp_path / "data"
    v1 = make_version(data, "v1", smollm2_gguf, base_identity, "Ziggy the octopus.", seed=1)
    venom_standin.answers_by_id = {"v1": {QUESTION: "Ziggy the octopus."}}
    outcomes = Outcomes()
    await outcomes.subscribe(nc)
    proc = subprocess.Popen(
        daemon_cmd("follow", "--data-dir", str(data), "--nats-url", nats_server.url, "--target", "venom",
                   "--venom-url", venom_standin.url),
        env=daemon_env(ACADEMY_FOLLOWER__VENOM_CHAT_URL=venom_standin.url + "/v1/chat/completions",
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
        assert subject == "model.deployed" and deployed["serving"] == "v1", deployed
        assert venom_standin.active == "v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert (data / "follower" / "state-venom.json").is_file()
