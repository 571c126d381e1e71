"""`academyd worker`: train the daemon's jobs on this host (with the trainer environment), over NATS."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from academyd.commands.common import EXIT_FAILED, EXIT_USAGE, add_settings_args, fail, guard, settings_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "worker",
        help="train the daemon's jobs on this host (GPU or CPU), over NATS",
        description="Pull training jobs from the daemon's NATS (a JetStream work queue), train them with this "
        "host's trainer environment, and send checkpoints, the adapter and the metrics back through the "
        "JetStream Object Store. Nothing is shared with the daemon's host but NATS. Jobs that need a GPU go "
        "only to workers that have one. SIGTERM stops the trainer (its checkpoint is kept) and hands the job "
        "to another worker at once.",
    )
    add_settings_args(p)
    p.add_argument("--work-dir", type=Path, default=Path("academy-worker"),
                   help="where jobs run on this host (default ./academy-worker)")
    p.add_argument("--id", help="this worker's name (default: its identity's, worker-<id>; else hostname-pid)")
    p.add_argument("--model", action="append", default=[], metavar="REF=PATH",
                   help="where the daemon's base model REF is on this host (repeatable); unset: REF itself")
    p.add_argument("--gpu", choices=["auto", "none"], default="auto",
                   help="auto: offer the GPU torch sees; none: CPU only")
    p.add_argument("--cpu-threads", type=int, help="torch threads per job (default: the job's)")
    p.add_argument("--trainer-python", type=Path, help="the trainer environment's interpreter")
    p.set_defaults(func=guard(_run))

    q = sub.add_parser(
        "worker-identity",
        help="create a worker's own NATS identity (worker-<id>) for the embedded server, or print its "
        "production config block",
        description="Each worker connects as its own identity, worker-<id>, which may write lease records, "
        "events and its advertisement only in its own name; the daemon trusts a result or progress only from "
        "the worker that holds the job's lease. Without --production: generate worker-<id>'s password in the "
        "daemon's data directory (<data_dir>/nats/users/worker-<id>.password, 0600) and have a running "
        "embedded server reload its users; an `academyd worker --id <id>` reading the same data directory "
        "uses it. With --production: print the user block for systemd/nats-server.conf.",
    )
    add_settings_args(q)
    q.add_argument("id", help="the worker's id (one NATS subject token: letters, digits, '-', '_')")
    q.add_argument("--production", action="store_true", help="print the nats-server.conf user block instead")
    q.set_defaults(func=guard(_identity))


def _identity(args: argparse.Namespace) -> int:
    from academyd import nats_auth

    if nats_auth.WORKER_NAME_RE.fullmatch(args.id) is None:
        return fail(f"a worker id is one NATS subject token ({nats_auth.WORKER_NAME_RE.pattern}), not {args.id!r}",
                    EXIT_USAGE)
    if args.production:
        print(nats_auth.render_production_worker(args.id))
        print(f"# its password: ${nats_auth.worker_password_env(args.id)} in the nats-server's environment; the "
              f"worker: ACADEMY_NATS__USER={nats_auth.worker_user(args.id)} ACADEMY_NATS__PASSWORD=...",
              file=sys.stderr)
        return 0
    settings = settings_from(args)
    path, reloaded = nats_auth.add_worker(settings.nats_dir, args.id)
    print(f"{nats_auth.worker_user(args.id)}: password in {path}"
          + ("; the running embedded server reloaded its users" if reloaded else
             "; the embedded server takes it at its next start"))
    return 0


def _run(args: argparse.Namespace) -> int:
    from academyd import logs
    from academyd.habitat.base import HabitatError
    from academyd.worker import Worker

    settings = settings_from(args)
    models: dict[str, str] = {}
    for item in args.model:
        ref, sep, path = item.partition("=")
        if not sep or not ref or not path:
            return fail(f"--model takes REF=PATH, got {item!r}", EXIT_USAGE)
        models[ref] = str(Path(path).resolve())
    logs.configure(settings.log_level, settings.log_format)
    try:
        worker = Worker(settings, work_dir=args.work_dir, worker_id=args.id, models=models, gpu=args.gpu,
                        cpu_threads=args.cpu_threads, trainer_python=args.trainer_python)
    except HabitatError as exc:
        return fail(str(exc), EXIT_USAGE)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.request_stop, sig.name)
        await worker.run()

    try:
        asyncio.run(main())
    except (HabitatError, OSError) as exc:
        return fail(str(exc), EXIT_FAILED)
    return 0
