"""`task.completed`: store Venom's finished task (training data, and the champion's success rate)."""

from __future__ import annotations

from academyd.curator.rules import is_successful_task
from handlers import Ack, HandlerContext, Outcome
from schemas.models import TaskCompleted


def handle(event: TaskCompleted, ctx: HandlerContext) -> Outcome:
    stored = ctx.store.insert_task(event, is_successful_task(event.status), ctx.now)
    return Ack(duplicate=not stored)
