"""The environment of every process the Academy starts (trainer, arena, dequantize, capability probe,
llama.cpp endpoint, embedded nats-server): an allowlist, not a copy of ours.

The daemon's own environment holds what a child must never see: the page's token (ACADEMY_HTTP__TOKEN),
NATS passwords (ACADEMY_NATS__PASSWORD, a creds path), an endpoint token, cloud keys of the host. A child
gets the variables that make it run (PATH, locale, the thread and GPU knobs of the numeric libraries,
the Hugging Face cache, the trainer's ACADEMY_TRAINER_* knobs) and what its caller passes explicitly;
any name that looks like a secret is left out even when its prefix is allowed (HF_TOKEN).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ALLOWED = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "NO_COLOR",
    "LD_LIBRARY_PATH", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "ACADEMY_BASE_CACHE",
})
ALLOWED_PREFIXES = (
    "LC_", "XDG_",
    "OMP_", "MKL_", "OPENBLAS_", "GOTO_", "KMP_", "GGML_", "LLAMA_",  # threads and kernels
    "CUDA_", "NVIDIA_", "ROCR_", "HIP_", "HSA_",  # which GPU
    "PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "BITSANDBYTES_", "UNSLOTH_",
    "ACADEMY_TRAINER_", "ACADEMY_TEST_",
)
SECRET_WORDS = ("TOKEN", "PASSWORD", "PASSWD", "SECRET", "CREDENTIAL", "CREDS", "APIKEY", "API_KEY", "_KEY",
                "AUTH", "COOKIE", "SESSION")


def allowed(name: str) -> bool:
    """Whether a variable of ours may reach a child. Pure."""
    upper = name.upper()
    if any(word in upper for word in SECRET_WORDS):
        return False
    return upper in ALLOWED or upper.startswith(ALLOWED_PREFIXES)


def child_env(extra: Mapping[str, str] | None = None, *, pythonpath: str | None = None,
              environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowlisted part of `environ` (ours by default), then `extra` (what the caller means to pass,
    taken as given), and PYTHONPATH when `pythonpath` is set."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if allowed(k)}
    env.update(extra or {})
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env
