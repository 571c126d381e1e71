"""Time, the one way the daemon tells and writes it: a `Clock` is any callable that returns an aware
datetime (`utcnow` in the daemon; tests pass one they move by hand); `iso` is the form every stored row
and every published event carries. Imports nothing of the daemon, so anything may depend on it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> datetime: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


@lru_cache(maxsize=256)  # a batch stamps thousands of rows with the same `now`
def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat()


def parse_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)
