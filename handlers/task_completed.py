"""`task.completed`: store Venom's task (training data, and the served version's success rate), or move a
stored one forward (PENDING < PROCESSING < COMPLETED | FAILED): academyd.attribution."""

from __future__ import annotations

from academyd.attribution import is_empty, leaks, served_version, status_rank
from academyd.curator.rules import is_successful_task
from handlers import Ack, HandlerContext, Outcome
from schemas.models import TaskCompleted


def handle(event: TaskCompleted, ctx: HandlerContext) -> Outcome:
    rank = status_rank(event.status)
    stored = ctx.store.insert_task(
        event, is_successful_task(event.status), ctx.now, rank=rank,
        served=served_version(event.model_version, event.context_history),
        empty=rank >= 2 and is_empty(event.result), leak=leaks(event.result, ctx.settings.watch.leak_markers),
    )
    return Ack(duplicate=not stored)
