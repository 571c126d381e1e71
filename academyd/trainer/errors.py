"""The trainer's three ways to stop early, each with its own exit code (see `academyd.trainer.__main__`)."""

from __future__ import annotations


class BadInput(Exception):
    """The spec's inputs are unusable (exit 2)."""


class TrainingFailure(Exception):
    """Training ran and failed (exit 3)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Cancelled(BaseException):
    """SIGTERM/SIGINT arrived (exit 5). BaseException so library `except Exception` blocks let it pass."""
