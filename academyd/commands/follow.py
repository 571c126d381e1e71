"""`academyd follow`: make a runtime serve what the Academy promotes (see academyd.follower)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from academyd.commands.common import EXIT_FAILED, EXIT_USAGE, add_settings_args, fail, guard, settings_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "follow", help="hot-swap a runtime to every promoted version (llama.cpp, Ollama or Venom)",
        description="Hold a durable consumer on model.promoted and model.rolled_back; verify each version's "
        "sha256 and base, load it beside the serving one, probe it with the arena's prompts, switch, and "
        "publish model.deployed or model.deploy_failed. Runs until SIGTERM/SIGINT.",
    )
    add_settings_args(p)
    p.add_argument("--target", choices=["llamacpp", "ollama", "venom"], help="follower.target (default llamacpp)")
    p.add_argument("--endpoint-url", help="llamacpp: join this running endpoint instead of starting one")
    p.add_argument("--base-gguf", type=Path, help="llamacpp: the base model GGUF the endpoint serves")
    p.add_argument("--port", type=int, help="llamacpp: the endpoint's port (default 8080; 0: a free one)")
    p.add_argument("--runtime-python", type=Path, help="llamacpp: an interpreter with llama-cpp-python")
    p.add_argument("--ollama-url", help="ollama: Ollama's URL")
    p.add_argument("--venom-url", help="venom: Venom's API URL")
    p.set_defaults(func=guard(_follow))


def _follow(args: argparse.Namespace) -> int:
    from academyd import logs
    from academyd.bus import BusError
    from academyd.follower import Follower
    from academyd.follower.targets import TargetError

    settings = settings_from(args)
    given = {"target": args.target, "endpoint_url": args.endpoint_url, "base_gguf": args.base_gguf,
             "port": args.port, "runtime_python": args.runtime_python, "ollama_url": args.ollama_url,
             "venom_url": args.venom_url}
    settings.follower = settings.follower.model_copy(update={k: v for k, v in given.items() if v is not None})
    logs.configure(settings.log_level, settings.log_format)
    try:
        follower = Follower(settings)
    except TargetError as exc:
        return fail(str(exc), EXIT_USAGE)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await follower.run(stop)

    try:
        asyncio.run(main())
    except (TargetError, BusError) as exc:
        return fail(str(exc), EXIT_FAILED)
    return 0
