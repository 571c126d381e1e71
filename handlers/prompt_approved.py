"""`prompt.approved`: an answer the user approved (Venom's hidden_prompts.jsonl), a curation source."""

from __future__ import annotations

from handlers import Ack, HandlerContext, Outcome
from schemas.models import PromptApproved


def handle(event: PromptApproved, ctx: HandlerContext) -> Outcome:
    return Ack(duplicate=not ctx.store.insert_approved_pair(event, ctx.now))
