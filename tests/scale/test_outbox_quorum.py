"""The outbox through a quorum loss of the outbound stream (a real 3-node cluster, R3 streams).

Two of the three nodes are stopped (not the one the daemon is connected to: its core connection stays up,
so every publish fails while "connected", the case that used to park `model.promoted` after 10 tries).
A promotion's `model.promoted` and the events around it are queued while the stream has no quorum; the
relay fails them more than 10 times, reports an outage (status, /healthz 503, /metrics) and parks
nothing. When the nodes come back, everything is in the stream, in the order it was queued.
"""

from __future__ import annotations

import asyncio

from typing import Any

import aiohttp
import nats
from fixtures.nats import wait_for
from fixtures.web import TOKEN
from scale.test_cluster import cluster_settings



def promoted(version: str, parent: str | None) -> dict[str, Any]:
    return {"version": version, "parent_version": parent, "base_model": "/models/base.gguf",
            "adapter_path": f"/data/models/{version}/adapter", "adapter_sha256": "0" * 64,
            "modelfile_path": f"/data/models/{version}/Modelfile", "ollama_model": f"venom-adapter-{version}",
            "reason": "better on held-out data"}


async def stream_subjects(servers: list[str], stream: str) -> list[tuple[str, str]]:
    """(subject, event id) of every message in `stream`, in stream order. Right after quorum returns the
    cluster may still answer 503 for a moment: this reader retries that, as the daemon's own code does."""
    from nats.js.errors import ServiceUnavailableError

    for attempt in range(60):
        try:
            return await _stream_subjects(servers, stream)
        except (ServiceUnavailableError, TimeoutError, nats.errors.TimeoutError):
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")


async def _stream_subjects(servers: list[str], stream: str) -> list[tuple[str, str]]:
    import json

    nc = await nats.connect(servers=servers)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
        out = []
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            out.append((msg.subject, json.loads(msg.data).get("event_id")))
        return out
    finally:
        await nc.close()


async def test_model_promoted_survives_a_quorum_loss_and_goes_out_in_order(
    nats_cluster, start_daemon, tmp_path, clock
) -> None:
    settings = cluster_settings(nats_cluster, tmp_path / "data", http={"enabled": True, "port": 0, "token": TOKEN},
                                outbox={"backoff_s": 0.05, "backoff_max_s": 0.2})
    d = await start_daemon(settings)
    app, store = d.app, d.app.store
    stream = settings.nats.outbound_stream
    connected = nats_cluster.node_for(str(app.bus.nc.connected_url.netloc))
    others = [n for n in nats_cluster.nodes if n is not connected]
    for node in others:
        node.stop()

    before = app.counters.outbox_transient_failures
    requested = app.evaluate("test", force=True, reason="around a promotion")
    with store.transaction():
        app.outbox.emit("model.promoted", "ev-promoted-v1", clock(), promoted("v1", None))
    with store.transaction():
        app.outbox.emit("model.promoted", "ev-promoted-v2", clock(), promoted("v2", "v1"))
    app.relay.kick()

    # More than 10 failed attempts while connected: an outage, reported; nothing parked.
    await wait_for(lambda: app.counters.outbox_transient_failures - before > 10, timeout=90, interval=0.2)
    assert app.bus.nc.is_connected
    assert store.outbox_counts() == {"pending": 3, "parked": 0}
    assert "outbox" in app.status()["health"]["problems"]
    async with aiohttp.ClientSession() as http:
        async with http.get(app.web.url + "/healthz") as r:
            assert r.status == 503 and "outbox" in (await r.json())["problems"]
        async with http.get(app.web.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            text = await r.text()
        assert 'academy_degraded{component="outbox"' in text
        failures = next(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("academy_outbox_transient_failures_total"))
        assert failures > 10

    for node in others:
        node.start()
    await wait_for(lambda: store.outbox_counts()["pending"] == 0, timeout=90, interval=0.2)
    assert store.outbox_counts() == {"pending": 0, "parked": 0}
    await wait_for(lambda: app.health.ok, timeout=10)
    got = [e for s, e in await stream_subjects(nats_cluster.servers, stream)]
    assert got == [requested["run_id"], "ev-promoted-v1", "ev-promoted-v2"], got
