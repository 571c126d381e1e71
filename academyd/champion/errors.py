"""Why a champion move was not made."""

from __future__ import annotations


class PromotionRefused(Exception):
    """The promotion or rollback was not done; the message says what is wrong and what to do."""


class StaleChampion(PromotionRefused):
    """The champion is no longer the one the decision was made against (another move came first)."""

    def __init__(self, message: str, *, expected: str | None, actual: str | None) -> None:
        super().__init__(message)
        self.expected, self.actual = expected, actual
