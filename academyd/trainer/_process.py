"""Process setup shared by every trainer entry point (train, tiny, evaluate).

Call `prepare()` first thing, before torch, transformers or unsloth are imported. It:
- makes the process offline (no hub downloads can happen on these machines; fail fast instead of hanging),
- hides torchvision: PyPI's torchvision wheel is built against CUDA torch and its operators do not load
  next to the CPU torch pinned in constraints.txt, and transformers/unsloth import it eagerly. The trainer
  is text-only, so it is never needed,
- moves fd 1 to stderr and hands back a private copy of the real stdout, so library chatter (Unsloth
  prints banners with print()) cannot corrupt the one-JSON-object-per-line protocol.
"""

from __future__ import annotations

import io
import os
import sys

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
