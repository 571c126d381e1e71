"""Who may do what on the Academy's NATS server: the identities, their permissions, their credentials.

Three identities, the same in the embedded server (`academyd.embedded`) and in the shipped production
config (`systemd/nats-server.conf`, which a test holds to the same behaviour):

- `academyd`, the daemon: manages its streams and consumers (`$JS.>`), publishes the Academy's events and
  dead letters, serves the `academy` service (it answers requests through `allow_responses`). It uses its
  own inbox prefix, so nobody else's `_INBOX.>` subscription sees its JetStream deliveries.
- `operator`, the CLI and people: may command (`academy.cmd.*`, `academy.status`, service discovery on
  `$SRV.>`), publish inbound events (`academyd import-venom`), read the events stream (`train --follow`).
- `agent`, Venom's agents: may publish the inbound subjects only (with the JetStream publish acks, which
  arrive on their `_INBOX`), and read the Academy's events (live, or with an ordered consumer on the events
  stream). No command, no stream or consumer management, no `academy.cmd.*` subscription (a queue
  subscriber there could answer commands in the daemon's name).
- `follower`, the serving side (`academyd follow`): its own durable consumer on the events stream
  (`academy-follower`: create, read, pull, ack), `model.deployed` / `model.deploy_failed`, `academy.status`
  (the champion it converges on). Its own inbox prefix. Nothing else: no stream admin, no other consumer.

Consumers on the events stream: an agent or an operator reads through ephemeral consumers the server names
(`$JS.API.CONSUMER.CREATE.<stream>` without a name; ordered consumers, nothing to ack) and may not pull
from, ack on, delete or (re)create a named one. A named consumer belongs to the identity whose permissions
name it (the follower's), so nobody else can take its messages, ack them away or delete it.

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

DAEMON, OPERATOR, AGENT, FOLLOWER = "academyd", "operator", "agent", "follower"
IDENTITIES = (DAEMON, OPERATOR, AGENT, FOLLOWER)
USERS_DIR = "users"
DAEMON_INBOX_PREFIX = "_INBOX_academyd"
FOLLOWER_INBOX_PREFIX = "_INBOX_follower"
FOLLOWER_CONSUMER = "academy-follower"

INBOUND = ["lesson.created", "commit.pushed", "task.completed", "feedback.given", "prompt.approved"]
EVENTS = ["academy.training.>", "academy.dataset.>", "academy.evaluation.>", "model.>"]


def _read_events_api(stream: str) -> list[str]:
    """JetStream API calls that read `stream` through an ephemeral consumer the server names (ordered
    consumers: pushed to the reader's inbox, nothing to ack), nothing else: no named consumer (create,
    pull, ack, delete), so no reader can touch a consumer that is not its own."""
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.FC.{stream}.>",
    ]


def _own_consumer_api(stream: str, consumer: str) -> list[str]:
    """Everything a durable pull consumer's owner needs on it (create or update, info, pull, ack)."""
    return [
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


def permissions(outbound_stream: str = "ACADEMY_EVENTS",
                follower_consumer: str = FOLLOWER_CONSUMER) -> dict[str, dict[str, Any]]:
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
        FOLLOWER: {
            "publish": {"allow": [*_own_consumer_api(outbound_stream, follower_consumer), "model.deployed",
                                  "model.deploy_failed", "academy.status"]},
            "subscribe": {"allow": [f"{FOLLOWER_INBOX_PREFIX}.>"]},
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
    prefix = {DAEMON: DAEMON_INBOX_PREFIX, FOLLOWER: FOLLOWER_INBOX_PREFIX}.get(name, "_INBOX")
    update: dict[str, Any] = {"user": name, "password": password, "token": None, "creds_file": None,
                              "inbox_prefix": prefix}
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
