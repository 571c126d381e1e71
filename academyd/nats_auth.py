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
- `worker-<id>`, one per `academyd worker` (`worker_permissions`): pulls and acks jobs, reads the lease
  records, artifacts and jobs, and writes only in its own name: lease records under `<run_id>.<id>`, events
  on `academy.jobs.events.<run_id>.<id>`, its advertisement under `<id>`; chunks and metas of the objects it
  uploads. No purge, no delete, no stream or consumer admin but its downloads' ephemeral consumers; its own
  inbox prefix (`_INBOX_w_<id>`). The server thus says which worker wrote a lease record or an event
  (academyd.worker.trust). Created on demand: `academyd worker-identity <id>`.

Consumers on the events stream: an agent or an operator reads through ephemeral consumers the server names
(`$JS.API.CONSUMER.CREATE.<stream>` without a name; ordered consumers, nothing to ack) and may not pull
from, ack on, delete or (re)create a named one. A named consumer belongs to the identity whose permissions
name it (the follower's), so nobody else can take its messages, ack them away or delete it.

Credentials of the embedded server are generated at its first start: one password file per identity,
`<data_dir>/nats/users/<name>.password`, mode 0600 in a 0700 directory; a worker's when it is added (and
the running server reloads its config). The daemon and the CLI read them
from the data directory; an agent is given `agent`'s (see README, "Talking to it").
"""

from __future__ import annotations

import os
import re
import secrets
import signal
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

WORKER_PREFIX = "worker-"  # a worker's NATS user is worker-<its id>
WORKER_INBOX_PREFIX = "_INBOX_w_"
WORKER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # academyd.worker.protocol.WORKER_ID_PATTERN

# The worker wire's names (academyd.settings.WorkersSettings defaults; the shipped config uses them too).
JOBS_STREAM, JOB_EVENTS_STREAM = "ACADEMY_JOBS", "ACADEMY_JOB_EVENTS"
REGISTRY_BUCKET, LEASES_BUCKET, ARTIFACTS_BUCKET = "academy_workers", "academy_leases", "academy_artifacts"

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


def worker_user(worker_id: str) -> str:
    return WORKER_PREFIX + worker_id


def worker_of(user: str | None) -> str | None:
    """The worker id a NATS user name is bound to (`worker-<id>`), None for any other user."""
    if user and user.startswith(WORKER_PREFIX) and WORKER_NAME_RE.fullmatch(user[len(WORKER_PREFIX):]):
        return user[len(WORKER_PREFIX):]
    return None


def worker_permissions(worker_id: str) -> dict[str, Any]:
    """What worker `worker_id` may do: everything `academyd worker` does, in its own name only. Pure."""
    w = worker_id
    kv_r, kv_l, obj = f"KV_{REGISTRY_BUCKET}", f"KV_{LEASES_BUCKET}", f"OBJ_{ARTIFACTS_BUCKET}"
    return {
        "publish": {"allow": [
            "$JS.API.INFO",
            f"$JS.API.STREAM.INFO.{JOBS_STREAM}", f"$JS.API.STREAM.INFO.{JOB_EVENTS_STREAM}",
            f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.academy-workers-any",
            f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.academy-workers-gpu",
            f"$JS.ACK.{JOBS_STREAM}.>",
            f"academy.jobs.events.*.{w}",
            "academy.dlq.academy.jobs.>",
            f"$JS.API.STREAM.INFO.{kv_r}", f"$KV.{REGISTRY_BUCKET}.{w}",
            f"$JS.API.DIRECT.GET.{kv_r}.>", f"$JS.API.STREAM.MSG.GET.{kv_r}",
            f"$JS.API.STREAM.INFO.{kv_l}", f"$KV.{LEASES_BUCKET}.*.{w}",
            f"$JS.API.DIRECT.GET.{kv_l}.>", f"$JS.API.STREAM.MSG.GET.{kv_l}",
            f"$JS.API.STREAM.INFO.{obj}", f"$O.{ARTIFACTS_BUCKET}.C.*", f"$O.{ARTIFACTS_BUCKET}.M.*",
            f"$JS.API.DIRECT.GET.{obj}.>", f"$JS.API.STREAM.MSG.GET.{obj}",
            f"$JS.API.CONSUMER.CREATE.{obj}", f"$JS.API.CONSUMER.CREATE.{obj}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{obj}.>", f"$JS.API.CONSUMER.DELETE.{obj}.>",
        ]},
        "subscribe": {"allow": [f"{WORKER_INBOX_PREFIX}{w}.>", "academy.jobs.cancel.>"]},
    }


def permissions(outbound_stream: str = "ACADEMY_EVENTS", follower_consumer: str = FOLLOWER_CONSUMER,
                workers: tuple[str, ...] | list[str] = ()) -> dict[str, dict[str, Any]]:
    """The permissions of each identity, as nats-server's `permissions` blocks (each worker's under its
    user, `worker-<id>`). Pure."""
    reads = _read_events_api(outbound_stream)
    return {
        **{worker_user(w): worker_permissions(w) for w in workers},
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


def _ensure_password(nats_dir: Path, name: str) -> str:
    folder = users_dir(nats_dir)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = password_file(nats_dir, name)
    password = read_password(nats_dir, name)
    if password is None:
        password = secrets.token_urlsafe(32)
        atomic_write_text(path, password + "\n", mode=0o600)
    os.chmod(path, 0o600)
    return password


def workers(nats_dir: Path) -> list[str]:
    """The workers that have an identity in this data directory (`worker-<id>.password`)."""
    files = users_dir(nats_dir).glob(f"{WORKER_PREFIX}*.password")
    found = (worker_of(p.name.removesuffix(".password")) for p in files)
    return sorted(w for w in found if w)


def ensure_credentials(nats_dir: Path) -> dict[str, str]:
    """Each identity's password: read, or generated on first use (0600 files, a 0700 directory); the
    workers' that were added (`add_worker`)."""
    found = {name: _ensure_password(nats_dir, name) for name in IDENTITIES}
    for w in workers(nats_dir):
        found[worker_user(w)] = _ensure_password(nats_dir, worker_user(w))
    return found


def add_worker(nats_dir: Path, worker_id: str) -> tuple[Path, bool]:
    """Worker `worker_id`'s identity in this data directory (its password file, generated if new), and
    whether a running embedded server was told to reload its config (SIGHUP: it takes the new user)."""
    if WORKER_NAME_RE.fullmatch(worker_id) is None:
        raise ValueError(f"a worker id is one NATS subject token: {WORKER_NAME_RE.pattern}, not {worker_id!r}")
    _ensure_password(nats_dir, worker_user(worker_id))
    return password_file(nats_dir, worker_user(worker_id)), _reload(nats_dir)


def _reload(nats_dir: Path) -> bool:
    """Rewrite the running embedded server's authorization (every identity here) and SIGHUP it."""
    conf = nats_dir / "nats.conf"
    try:
        pid = int((nats_dir / "nats-server.pid").read_text().strip())
        if b"nats-server" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        text = conf.read_text()
    except (OSError, ValueError):
        return False
    head, sep, _ = text.partition("authorization {")
    if not sep:
        return False
    outbound = re.search(r'^# outbound_stream: (\S+)$', text, re.M)
    passwords = ensure_credentials(nats_dir)
    perms = permissions(outbound.group(1) if outbound else "ACADEMY_EVENTS", workers=workers(nats_dir))
    atomic_write_text(conf, head + render_authorization(passwords, perms) + "\n", mode=0o600)
    os.kill(pid, signal.SIGHUP)
    return True


def as_identity(cfg: NatsSettings, name: str, password: str) -> NatsSettings:
    """`cfg` with `name`'s credentials for the embedded server (the daemon also gets its own inbox)."""
    prefix = {DAEMON: DAEMON_INBOX_PREFIX, FOLLOWER: FOLLOWER_INBOX_PREFIX}.get(name, "_INBOX")
    if (w := worker_of(name)) is not None:
        prefix = WORKER_INBOX_PREFIX + w
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


def worker_password_env(worker_id: str) -> str:
    """The environment variable of worker `worker_id`'s password in the shipped production config."""
    return f"ACADEMY_WORKER_{re.sub(r'[^A-Za-z0-9]', '_', worker_id).upper()}_NATS_PASSWORD"


def render_production_worker(worker_id: str) -> str:
    """Worker `worker_id`'s user in the production config (`systemd/nats-server.conf`), its password from
    the environment (`worker_password_env`): what `academyd worker-identity <id> --production` prints."""
    p = worker_permissions(worker_id)

    def wrapped(items: list[str], indent: int) -> str:
        lines, line = [], ""
        for item in (f'"{s}"' for s in items):
            if line and len(line) + len(item) + 2 > 100 - indent:
                lines.append(line + ",")
                line = ""
            line = f"{line}, {item}" if line else item
        lines.append(line)
        return ("\n" + " " * indent).join(lines)

    return "\n".join([
        f"    {{ user: {worker_user(worker_id)}, password: ${worker_password_env(worker_id)},",
        "      permissions: {",
        f"        publish: {{ allow: [{wrapped(p['publish']['allow'], 25)}] }}",
        f"        subscribe: {{ allow: [{wrapped(p['subscribe']['allow'], 27)}] }} }} }}",
    ])
