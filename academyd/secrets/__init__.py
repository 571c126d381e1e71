"""Secrets never leave the daemon: one scanner per process guards datasets, logs, dead letters, events,
the live feed, status and trainer inputs.

`scanner()` is that one scanner, built on first use (a lock makes two threads that ask at once get the
same one) and safe to use from any thread; a worker process builds its own on first use. It is the one
piece of process-wide state besides logging: configuring detect-secrets per call, in a process-wide
settings object, is what let a thread scan with no plugins at all.
"""

from __future__ import annotations

import threading
from typing import Any

from academyd.secrets.scanner import REDACTED, WITHHELD, Finding, Scanner

__all__ = ["REDACTED", "WITHHELD", "Finding", "Scanner", "log_processor", "redact", "redact_obj", "scanner"]

_lock = threading.Lock()
_instance: list[Scanner] = []


def scanner() -> Scanner:
    """The process's scanner (compiled once, ~50 ms)."""
    if not _instance:
        with _lock:
            if not _instance:
                _instance.append(Scanner())
    return _instance[0]


def redact(text: str) -> str:
    return scanner().redact(text)


def redact_obj(obj: Any) -> Any:
    return scanner().redact_obj(obj)


def log_processor(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: every value of every log event redacted (place it before the renderer)."""
    out: dict[str, Any] = scanner().redact_obj(event_dict)
    return out
