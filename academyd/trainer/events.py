"""The trainer's event stream: one JSON object per line on stdout and appended to events.jsonl.

Writing to both lets the process that started the trainer read the pipe while anyone else (a re-attached
daemon, a remote watcher) follows the file. Non-finite floats become null so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Emits protocol events; `attach` adds the events.jsonl copy once the output directory is known."""

    def __init__(self, stream: IO[str], clock: Callable[[], float] = time.time) -> None:
        self._stream = stream
        self._clock = clock
        self._file: IO[str] | None = None

    def attach(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = _clean({"type": type_, "time": round(self._clock(), 3), **fields})
        line = json.dumps(event, allow_nan=False) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        try:
            self._stream.write(line)
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            # Nobody reads the pipe any more (the daemon went away); events.jsonl still has everything.
            pass
        return event
