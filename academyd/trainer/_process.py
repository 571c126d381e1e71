"""Process setup shared by every trainer entry point (train, evaluate; the tests' tiny model builder too).

Call `prepare()` first thing, before torch, transformers or unsloth are imported. It:
- makes the process offline (no hub downloads can happen on these machines; fail fast instead of hanging),
- hides torchvision: PyPI's torchvision wheel is built against CUDA torch and its operators do not load
  next to the CPU torch pinned in constraints.txt, and transformers/unsloth import it eagerly. The trainer
  is text-only, so it is never needed,
- moves fd 1 to stderr and hands back a private copy of the real stdout, so library chatter (Unsloth
  prints banners with print()) cannot corrupt the one-JSON-object-per-line protocol.

`die_with(os.environ.get(PARENT_ENV))`: a trainer that must not outlive a process (an `academyd worker`:
a SIGKILLed worker's job goes to another worker, and an orphan would train it twice and hold the GPU)
ends its own process group once that process is gone. The trainer runs under a wrapper shell in its own
session that ignores TERM/INT/HUP, so nothing else reaches it when the worker dies.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time

_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "UNSLOTH_SKIP_TORCHVISION_CHECK": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "PYTHONWARNINGS": "ignore",
    "WANDB_DISABLED": "true",
}


PARENT_ENV = "ACADEMY_TRAINER_PARENT"  # "<pid>:<start time>" (/proc/<pid>/stat field 22) of the process to die with


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (tells a reused pid apart); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields[0] != b"Z" else None


def die_with(parent: str | None, *, poll_s: float = 0.5) -> None:
    """When `parent` ("<pid>:<start>") is set: a daemon thread SIGKILLs this process group (the wrapper
    shell and the trainer) within `poll_s` of that process's end. Nothing is kept: the job is no longer
    this host's (its lease runs out), the last uploaded checkpoint is what a resume starts from."""
    if not parent:
        return
    pid, start = (int(x) for x in parent.split(":", 1))

    def watch() -> None:
        while process_start(pid) == start:
            time.sleep(poll_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def prepare() -> io.TextIOWrapper:
    """Set the process up for a trainer entry point; return the protocol stream (the real stdout)."""
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)
    if os.environ.get("ACADEMY_TRAINER_ALLOW_TORCHVISION") != "1":
        # None in sys.modules makes `import torchvision` raise ImportError, which every library handles.
        sys.modules["torchvision"] = None  # type: ignore[assignment]
    sys.stdout.flush()
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    return os.fdopen(proto_fd, "w", buffering=1, encoding="utf-8")
