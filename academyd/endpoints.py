"""The `academy` service's endpoints (NATS request/reply): `academy.status` and the `academy.cmd.*`
commands, each validated against its schema (`schemas.models.COMMANDS`) before anything acts on it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from academyd.events import describe
from academyd.seams import ChampionMoves, ModelActions, RunRequests, StatusSource
from schemas.models import COMMANDS, DatasetCommand, PromoteCommand, RollbackCommand, TrainCommand

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def endpoints(status: StatusSource, runs: RunRequests, pipeline: ModelActions,
              champion: ChampionMoves) -> dict[str, Handler]:
    async def on_status(body: dict[str, Any]) -> dict[str, Any]:
        COMMANDS["academy.status"].model_validate(body)
        return {"ok": True, **status.status()}

    async def on_train(body: dict[str, Any]) -> dict[str, Any]:
        cmd = validated("academy.cmd.train", body, TrainCommand)
        return runs.evaluate("command", force=cmd.force, reason=f"{cmd.reason} (forced)" if cmd.force else None)

    async def on_dataset(body: dict[str, Any]) -> dict[str, Any]:
        cmd = validated("academy.cmd.dataset", body, DatasetCommand)
        return await pipeline.build_dataset(reason=cmd.reason)

    async def on_promote(body: dict[str, Any]) -> dict[str, Any]:
        cmd = validated("academy.cmd.promote", body, PromoteCommand)
        return await champion.promote(cmd.version, reason=cmd.reason)

    async def on_rollback(body: dict[str, Any]) -> dict[str, Any]:
        cmd = validated("academy.cmd.rollback", body, RollbackCommand)
        return await champion.rollback(reason=cmd.reason)

    return {
        "academy.status": on_status,
        "academy.cmd.train": on_train,
        "academy.cmd.dataset": on_dataset,
        "academy.cmd.promote": on_promote,
        "academy.cmd.rollback": on_rollback,
    }


def validated(subject: str, body: dict[str, Any], model: type[M]) -> M:
    """`body` as `subject`'s command; ValueError naming each bad field."""
    assert COMMANDS[subject] is model
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ValueError(f"bad {subject} request: {describe(exc)}") from None
