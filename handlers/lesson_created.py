"""`lesson.created`: store Venom's lesson; its success (Venom's rule) decides whether it counts."""

from __future__ import annotations

from academyd.curator.rules import is_successful_lesson
from handlers import Ack, HandlerContext, Outcome
from schemas.models import LessonCreated


def handle(event: LessonCreated, ctx: HandlerContext) -> Outcome:
    success = is_successful_lesson(event.result, event.metadata)
    stored = ctx.store.insert_lesson(event, success, ctx.now)
    # Same lesson_id under a new event id (e.g. Venom re-sent it): already kept, nothing to add.
    return Ack(duplicate=not stored)
