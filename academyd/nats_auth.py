"""Who may do what on the Academy's NATS server: the identities, their permissions, their credentials.

Three identities, the same in the embedded server (`academyd.embedded`) and in the shipped production
config (`systemd/nats-server.conf`, which a test holds to the same behaviour):

- `academyd`, the daemon: manages its streams and consumers (`$JS.>`), publishes the Academy's events and
  dead letters, serves the `academy` service (it answers requests through `allow_responses`). It uses its
  own inbox prefix, so nobody else's `_INBOX.>` subscription sees its JetStream deliveries.
- `operator`, the CLI and people: may command (`academy.cmd.*`, `academy.status`, service discovery on
  `$SRV.>`), publish inbound events (`academyd import-venom`), read the events stream (`train --follow`).
- `agent`, Venom's agents: may publish the inbound subjects only (with the JetStream publish acks, which
  arrive on their `_INBOX`), and read the Academy's events (live, or with a consumer on the events
  stream). No command, no stream or consumer management, no `academy.cmd.*` subscription (a queue
  subscriber there could answer commands in the daemon's name).

Credentials of the embedded server are generated at its first start: one password file per identity,
`<data_dir>/nats/users/<name>.password`, mode 0600 in a 0700 directory. The daemon and the CLI read them
from the data directory; an agent is given `agent`'s (see README, "Talking to it").
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from academyd.files import atomic_write_text

if TYPE_CHECKING:
    from academyd.settings import NatsSettings

DAEMON, OPERATOR, AGENT = "academyd", "operator", "agent"
IDENTITIES = (DAEMON, OPERATOR, AGENT)
USERS_DIR = "users"
DAEMON_INBOX_PREFIX = "_INBOX_academyd"

INBOUND = ["lesson.created", "commit.pushed", "task.completed", "feedback.given", "prompt.approved"]
EVENTS = ["academy.training.>", "academy.dataset.>", "academy.evaluation.>", "model.>"]


def _read_events_api(stream: str) -> list[str]:
    """JetStream API calls that read `stream` through an ephemeral or ordered consumer, nothing else."""
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def permissions(outbound_stream: str = "ACADEMY_EVENTS") -> dict[str, dict[str, Any]]:
    """The permissions of each identity, as nats-server's `permissions` blocks. Pure."""
    reads = _read_events_api(outbound_stream)
    return {
        DAEMON: {
            "publish": {"allow": ["$JS.>", "$SRV.>", "$O.>", "$KV.>", "academy.>", "model.>",
                                  f"{DAEMON_INBOX_PREFIX}.>"]},
            "subscribe": {"allow": [">"]},
            "allow_responses": True,
        },
        OPERATOR: {
            "publish": {"allow": ["academy.cmd.*", "academy.status", "$SRV.>", *INBOUND, *reads]},
            "subscribe": {"allow": ["_INBOX.>", *EVENTS, "academy.dlq.>"]},
        },
        AGENT: {
            "publish": {"allow": [*INBOUND, *reads]},
            "subscribe": {"allow": ["_INBOX.>", *EVENTS]},
        },
    }


def users_dir(nats_dir: Path) -> Path:
    return nats_dir / USERS_DIR


def password_file(nats_dir: Path, name: str) -> Path:
    return users_dir(nats_dir) / f"{name}.password"


def read_password(nats_dir: Path, name: str) -> str | None:
    """The generated password of `name`, None when the embedded server never started in this data dir."""
    try:
        return password_file(nats_dir, name).read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_credentials(nats_dir: Path) -> dict[str, str]:
    """Each identity's password: read, or generated on first use (0600 files, a 0700 directory)."""
    folder = users_dir(nats_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    found: dict[str, str] = {}
    for name in IDENTITIES:
        path = password_file(nats_dir, name)
        password = read_password(nats_dir, name)
        if password is None:
            password = secrets.token_urlsafe(32)
            atomic_write_text(path, password + "\n", mode=0o600)
        os.chmod(path, 0o600)
        found[name] = password
    return found


def as_identity(cfg: NatsSettings, name: str, password: str) -> NatsSettings:
    """`cfg` with `name`'s credentials for the embedded server (the daemon also gets its own inbox)."""
    update: dict[str, Any] = {"user": name, "password": password, "token": None, "creds_file": None,
                              "inbox_prefix": DAEMON_INBOX_PREFIX if name == DAEMON else "_INBOX"}
    return cfg.model_copy(update=update)


def _conf_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def render_authorization(passwords: dict[str, str], perms: dict[str, dict[str, Any]]) -> str:
    """nats-server's `authorization` block for these users (quoted strings: `$` is not a variable there)."""
    lines = ["authorization {", "  users: ["]
    for name, password in passwords.items():
        p = perms[name]
        block = [f'publish: {{ allow: {_conf_list(p["publish"]["allow"])} }}',
                 f'subscribe: {{ allow: {_conf_list(p["subscribe"]["allow"])} }}']
        if p.get("allow_responses"):
            block.append("allow_responses: true")
        lines.append(f'    {{ user: "{name}", password: "{password}", permissions: {{ ' + ", ".join(block) + " } }")
    lines += ["  ]", "}"]
    return "\n".join(lines)
