"""Joining a secured NATS server: user/password, token, TLS; and a clear error when it says no."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest

from academyd.bus import BusError
from academyd.embedded import find_server_binary, free_port
from fixtures.nats import lesson, publish, wait_for


def start_server(tmp: Path, extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "secure.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{tmp / "js"}" }}\n{extra}\n')
    proc = subprocess.Popen([str(find_server_binary()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, port


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("server_auth", "good", "bad"),
    [
        ('authorization { user: academyd, password: "s3cret" }',
         {"user": "academyd", "password": "s3cret"}, {"user": "academyd", "password": "wrong"}),
        ('authorization { token: "t0ken-value" }', {"token": "t0ken-value"}, {"token": "nope"}),
    ],
    ids=["user-password", "token"],
)
async def test_daemon_joins_a_secured_server(tmp_path, make_settings, start_daemon, server_auth, good, bad) -> None:
    proc, port = start_server(tmp_path, server_auth)
    try:
        await wait_port(port)
        url = f"nats://127.0.0.1:{port}"
        d = await start_daemon(make_settings(nats={"url": url, **good}))
        client_opts = {"user": good.get("user"), "password": good.get("password"), "token": good.get("token")}
        nc = await nats.connect(url, **{k: v for k, v in client_opts.items() if v})
        await publish(nc.jetstream(), "lesson.created", lesson(1), "ev-lesson-1")
        await wait_for(lambda: d.app.store.counts()["lesson.created"] == 1)
        await nc.close()
        await d.stop()

        from academyd.app import App

        app = App(make_settings(nats={"url": url, **bad}))
        with pytest.raises(BusError, match="cannot connect to NATS") as err:
            await asyncio.wait_for(app.start(), 20)
        assert "credentials" in str(err.value)
        await app.stop()
    finally:
        proc.terminate()
        proc.wait()


def make_cert(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return key, cert


async def test_daemon_joins_over_tls(tmp_path, make_settings, start_daemon) -> None:
    key, cert = make_cert(tmp_path)
    proc, port = start_server(tmp_path, f'tls {{ cert_file: "{cert}", key_file: "{key}" }}')
    try:
        await wait_port(port)
        url = f"tls://127.0.0.1:{port}"
        d = await start_daemon(make_settings(nats={"url": url, "tls_ca": str(cert)}))
        import ssl

        ctx = ssl.create_default_context(cafile=str(cert))
        nc = await nats.connect(url, tls=ctx)
        reply = await nc.request("academy.status", b"", timeout=5)
        assert json.loads(reply.data)["ok"] is True
        await publish(nc.jetstream(), "lesson.created", lesson(1), "ev-lesson-1")
        await wait_for(lambda: d.app.store.counts()["lesson.created"] == 1)
        await nc.close()
        await d.stop()
    finally:
        proc.terminate()
        proc.wait()


def test_missing_creds_file_is_a_clear_error(tmp_path) -> None:
    from academyd.bus import connect_options
    from academyd.settings import NatsSettings

    with pytest.raises(BusError, match="credentials file .* not found"):
        connect_options(NatsSettings(creds_file=tmp_path / "none.creds"), "nats://127.0.0.1:4222")


# ------------------------------------------------------------------ least-privilege identities

SHIPPED_CONF = Path(__file__).resolve().parents[2] / "systemd" / "nats-server.conf"


def shipped_config(tmp: Path, port: int) -> Path:
    """The shipped production config, adapted only in its ports and paths."""
    text = SHIPPED_CONF.read_text()
    for old, new in (("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{port}"),
                     ("http: 127.0.0.1:8222", f"http: 127.0.0.1:{free_port()}"),
                     ("store_dir: /var/lib/nats/jetstream", f'store_dir: "{tmp / "js"}"')):
        assert old in text, f"the shipped config no longer has {old!r}: adapt this test"
        text = text.replace(old, new)
    conf = tmp / "production.conf"
    conf.write_text(text)
    return conf


class Client:
    """A NATS client that remembers what the server refused it (permission violations arrive async)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def connect(self, url: str, user: str, password: str, **kw: Any) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(url, user=user, password=password, error_cb=on_error,
                                     allow_reconnect=False, **kw)
        return self

    async def refused(self, what: str) -> bool:
        for _ in range(100):
            if any(what in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


@pytest.fixture(params=["shipped-config", "embedded-server"])
async def secured(request, tmp_path, make_settings, start_daemon) -> Any:
    """A daemon on a server with the identities: (daemon, url, {role: (user, password)}, daemon's creds)."""
    if request.param == "shipped-config":
        port = free_port()
        passwords = {"venom": "agent-pw", "operator": "operator-pw", "academyd": "daemon-pw"}
        env = {**os.environ, "VENOM_NATS_PASSWORD": passwords["venom"],
               "OPERATOR_NATS_PASSWORD": passwords["operator"], "ACADEMYD_NATS_PASSWORD": passwords["academyd"],
               "ACADEMY_WORKER_GPU1_NATS_PASSWORD": "worker-unused-here",  # the workers' identities: tests/scale
               "ACADEMY_WORKER_GPU2_NATS_PASSWORD": "worker-unused-here",
               "ACADEMY_FOLLOWER_NATS_PASSWORD": "follower-pw"}
        proc = subprocess.Popen([str(find_server_binary()), "-c", str(shipped_config(tmp_path, port))], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await wait_port(port)
        url = f"nats://127.0.0.1:{port}"
        d = await start_daemon(make_settings(nats={"url": url, "user": "academyd", "password": "daemon-pw",
                                                   "inbox_prefix": "_INBOX_academyd"}))
        roles = {"agent": ("venom", passwords["venom"]), "operator": ("operator", passwords["operator"]),
                 "daemon": ("academyd", passwords["academyd"]), "follower": ("academy-follower", "follower-pw")}
        yield d, url, roles
        await d.stop()
        proc.terminate()
        proc.wait()
        return
    d = await start_daemon(make_settings(nats={"url": None, "embedded_port": 0}))
    users = d.app.settings.nats_dir / "users"
    assert stat.S_IMODE(users.stat().st_mode) == 0o700
    roles = {}
    for role, name in (("agent", "agent"), ("operator", "operator"), ("daemon", "academyd"), ("follower", "follower")):
        path = users / f"{name}.password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        roles[role] = (name, path.read_text().strip())
    assert stat.S_IMODE((d.app.settings.nats_dir / "nats.conf").stat().st_mode) == 0o600
    yield d, d.app.nats_url, roles
    await d.stop()


async def test_agents_publish_only_and_operators_command(secured) -> None:
    d, url, roles = secured
    # Nobody gets in without credentials.
    with pytest.raises(Exception, match="(?i)authorization"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)

    agent = await Client().connect(url, *roles["agent"])
    js = agent.nc.jetstream(timeout=2)
    ack = await publish(js, "lesson.created", lesson(1), "ev-lesson-1")  # the JetStream ack reaches the agent
    assert ack.stream == "ACADEMY_INBOUND"
    await wait_for(lambda: d.app.store.counts()["lesson.created"] == 1)

    # No command: the request never reaches the daemon.
    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.request("academy.cmd.promote", json.dumps({"version": "v0001"}).encode(), timeout=1)
    assert await agent.refused('publish to "academy.cmd.promote"'), agent.errors
    with pytest.raises(nats.errors.TimeoutError):
        await agent.nc.request("academy.cmd.rollback", b"{}", timeout=1)
    # No stream admin: the inbound stream survives an agent's delete.
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream("ACADEMY_INBOUND")
    assert await agent.refused('publish to "$js.api.stream.delete.academy_inbound"'), agent.errors
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_stream(name="EVIL", subjects=["academy.cmd.>"])
    # No listening in on commands (a queue subscriber could answer in the daemon's name) or the daemon's inbox.
    await agent.nc.subscribe("academy.cmd.>", queue="q")
    assert await agent.refused('subscription to "academy.cmd.>"'), agent.errors
    await agent.nc.subscribe("_INBOX_academyd.>")
    assert await agent.refused('subscription to "_inbox_academyd.>"'), agent.errors
    # Events: yes, and the agent may read the events stream.
    info = await js.stream_info("ACADEMY_EVENTS")
    assert info.config.name == "ACADEMY_EVENTS"
    await agent.nc.close()

    daemon = await Client().connect(url, *roles["daemon"])
    inbound = await daemon.nc.jetstream(timeout=5).stream_info("ACADEMY_INBOUND")
    assert inbound.state.messages == 1
    await daemon.nc.close()

    operator = await Client().connect(url, *roles["operator"])
    reply = json.loads((await operator.nc.request("academy.status", b"{}", timeout=10)).data)
    assert reply["ok"] is True and reply["counts"]["lesson.created"] == 1
    promote = await operator.nc.request("academy.cmd.promote", json.dumps({"version": "v9999"}).encode(),
                                        timeout=10)
    answer = json.loads(promote.data)
    assert answer.get("ok") is False and "v9999" in json.dumps(answer), answer  # the daemon answered
    ojs = operator.nc.jetstream(timeout=2)
    with pytest.raises(nats.errors.TimeoutError):
        await ojs.delete_stream("ACADEMY_INBOUND")
    assert operator.errors and all("permissions violation" in e.lower() for e in operator.errors)
    await operator.nc.close()


async def test_only_the_follower_touches_its_consumer(secured) -> None:
    """The follower's durable consumer (academy-follower) is its own: it creates, pulls and acks it and
    publishes its outcomes; an agent or an operator cannot pull from it, ack on it, delete it or make a named
    consumer of its own, yet both still read the events through an ordered consumer."""
    from nats.js.api import AckPolicy, ConsumerConfig

    d, url, roles = secured
    stream, durable = "ACADEMY_EVENTS", "academy-follower"
    follower = await Client().connect(url, *roles["follower"], inbox_prefix="_INBOX_follower")
    fjs = follower.nc.jetstream(timeout=5)
    await fjs.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                  filter_subjects=["model.promoted", "model.rolled_back"]))
    fsub = await fjs.pull_subscribe_bind(durable=durable, stream=stream)

    agent = await Client().connect(url, *roles["agent"])
    seen: list[str] = []

    async def on_event(msg: Any) -> None:
        seen.append(json.loads(msg.data)["version"])

    ordered = await agent.nc.jetstream(timeout=5).subscribe("model.promoted", stream=stream, ordered_consumer=True,
                                                            cb=on_event)
    daemon = await nats.connect(url, user=roles["daemon"][0], password=roles["daemon"][1],
                                inbox_prefix="_INBOX_academyd", allow_reconnect=False)
    await daemon.jetstream(timeout=5).publish("model.promoted", b'{"version": "v1"}', headers={"Nats-Msg-Id": "p-1"})
    await wait_for(lambda: seen == ["v1"])  # the agent reads the events, through a consumer the server named

    for who in ("agent", "operator"):
        c = agent if who == "agent" else await Client().connect(url, *roles["operator"])
        js = c.nc.jetstream(timeout=0.5)
        sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=0.5)
        assert await c.refused(f'publish to "$js.api.consumer.msg.next.{stream.lower()}.{durable}"'), (who, c.errors)
        with pytest.raises(nats.errors.TimeoutError):
            await js.delete_consumer(stream, durable)
        assert await c.refused(f'publish to "$js.api.consumer.delete.{stream.lower()}.{durable}"'), (who, c.errors)
        await c.nc.publish(f"$JS.ACK.{stream}.{durable}.1.1.1.0.0", b"+ACK")  # a forged ack
        assert await c.refused(f'publish to "$js.ack.{stream.lower()}.{durable}.'), (who, c.errors)
        with pytest.raises(nats.errors.TimeoutError):  # nor a named (durable) consumer of its own
            await js.add_consumer(stream, ConsumerConfig(durable_name=f"{who}-durable"))
        if who == "operator":
            await c.nc.close()
    await ordered.unsubscribe()

    # The message is still the follower's: it pulls it, acks it, and says so on model.deployed.
    msgs = await fsub.fetch(1, timeout=5)
    assert json.loads(msgs[0].data)["version"] == "v1" and msgs[0].metadata.num_delivered == 1
    await msgs[0].ack_sync(timeout=5)
    ack = await fjs.publish("model.deployed", b'{"version": "v1"}', headers={"Nats-Msg-Id": "d-1"})
    assert ack.stream == stream
    info = await daemon.jetstream(timeout=5).consumer_info(stream, durable)
    assert info.num_ack_pending == 0 and info.delivered.stream_seq >= 1
    # ... and nothing more than that: no stream admin, no other subject, no other consumer.
    with pytest.raises(nats.errors.TimeoutError):
        await follower.nc.jetstream(timeout=1).delete_stream(stream)
    await follower.nc.publish("model.promoted", b"{}")
    assert await follower.refused('publish to "model.promoted"'), follower.errors
    await follower.nc.close()
    await agent.nc.close()
    await daemon.close()
