"""What every subcommand shares: settings options, talking to the daemon, printing for people or scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from academyd.settings import NatsSettings, Settings, SettingsError, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("settings (flags override ACADEMY_* environment and the TOML file)")
    g.add_argument("--config", type=Path, help="TOML settings file (or ACADEMY_CONFIG)")
    g.add_argument("--data-dir", type=Path, help="data directory (ACADEMY_DATA_DIR, default ./data)")
    g.add_argument("--nats-url", help="join this NATS server (ACADEMY_NATS__URL); unset: embedded server")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides: dict[str, Any] = {"data_dir": getattr(args, "data_dir", None), **extra}
    nats_url = getattr(args, "nats_url", None)
    settings = load_settings(getattr(args, "config", None), **overrides)
    if nats_url:
        settings.nats.url = nats_url
    return settings


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"academyd: {message}", file=sys.stderr)
    return code


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def daemon_url(settings: Settings) -> str:
    """Where the daemon's NATS is: the configured URL, else the embedded server's loopback port."""
    if settings.nats.url:
        return settings.nats.url
    return f"nats://127.0.0.1:{settings.nats.embedded_port or 4222}"


def client_nats(settings: Settings) -> NatsSettings:
    """How the CLI authenticates: as configured, or with the embedded server as the generated `operator`."""
    from academyd.nats_auth import OPERATOR, as_identity, password_file, read_password

    cfg = settings.nats
    if cfg.url or cfg.user or cfg.token or cfg.creds_file:
        return cfg
    password = read_password(settings.nats_dir, OPERATOR)
    if password is None:
        raise DaemonUnreachable(
            f"no credentials for the embedded NATS server ({password_file(settings.nats_dir, OPERATOR)} is "
            "missing): start the daemon in this data directory first (`academyd run` or `make run`), pass "
            "its --data-dir / ACADEMY_DATA_DIR, or --nats-url / ACADEMY_NATS__URL for another server."
        )
    return as_identity(cfg, OPERATOR, password)


def cli_connect_options(settings: Settings) -> dict[str, Any]:
    """Connection options for a one-shot CLI client: give up fast and quietly when nobody is there.

    (nats-py's `max_reconnect_attempts=0` means "retry forever" during the first connect, and its default
    error callback prints a traceback per attempt.)
    """
    from academyd.bus import connect_options

    async def quiet(exc: Exception) -> None:
        return None

    opts = connect_options(client_nats(settings), daemon_url(settings))
    opts.update(max_reconnect_attempts=1, reconnect_time_wait=0.1, allow_reconnect=False, connect_timeout=2,
                error_cb=quiet)
    return opts


async def _request(settings: Settings, subject: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    import nats

    nc = await nats.connect(**cli_connect_options(settings))
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    finally:
        await nc.close()
    reply = json.loads(msg.data or b"{}")
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        reply.setdefault("ok", False)
        reply.setdefault("error", msg.headers.get("Nats-Service-Error"))
    return reply


class DaemonUnreachable(Exception):
    pass


def request(settings: Settings, subject: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the running daemon (the `academy` service) and return its JSON reply."""
    try:
        return asyncio.run(_request(settings, subject, body or {}, timeout))
    except Exception as exc:
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout

        if isinstance(exc, (NoRespondersError, NatsTimeout, OSError)) or "connect" in str(exc).lower():
            raise DaemonUnreachable(
                f"no academyd answered on {daemon_url(settings)} ({type(exc).__name__}). "
                "Start it with `academyd run` (or `make run`), or pass --nats-url / ACADEMY_NATS__URL."
            ) from None
        raise


def guard(fn: Any) -> Any:
    """Turn the errors a user can cause into one readable line and a meaningful exit code."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return int(fn(args) or 0)
        except SettingsError as exc:
            return fail(str(exc), EXIT_USAGE)
        except DaemonUnreachable as exc:
            return fail(str(exc), EXIT_UNREACHABLE)

    return wrapper
