"""Joining a secured NATS server: user/password, token, TLS; and a clear error when it says no."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

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
