"""`feedback.given`: a thumbs up or down on a task (Venom's feedback.jsonl), joined to the task by task_id
when the watch reads outcomes; it may arrive before the task itself."""

from __future__ import annotations

from handlers import Ack, HandlerContext, Outcome
from schemas.models import FeedbackGiven


def handle(event: FeedbackGiven, ctx: HandlerContext) -> Outcome:
    return Ack(duplicate=not ctx.store.insert_feedback(event, ctx.now))
