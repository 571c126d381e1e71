"""`commit.pushed`: a commit in an allowlisted repository; waits (Retry) until the sha is there."""

from __future__ import annotations

from academyd.curator.git import commit_available
from handlers import Ack, HandlerContext, Outcome, Reject, Retry
from schemas.models import CommitPushed

SHA_RETRY_S = 30.0


def handle(event: CommitPushed, ctx: HandlerContext) -> Outcome:
    path = ctx.settings.repos.get(event.repo)
    if path is None:
        allowed = ", ".join(sorted(ctx.settings.repos)) or "none configured"
        return Reject("repo_not_allowed", f"repo {event.repo!r} is not in the allowlist ({allowed})")
    found = ((event.repo, event.sha) in ctx.known_commits if ctx.known_commits is not None
             else commit_available(path, event.sha))
    if not found:
        # The push may not have reached the local clone yet; the bus dead-letters after the last try.
        return Retry(SHA_RETRY_S, f"commit {event.sha} not found in {event.repo}")
    stored = ctx.store.insert_commit(event, ctx.now)
    return Ack(duplicate=not stored)


handle.may_refuse = True  # type: ignore[attr-defined]  # Retry/Reject: the ingestor wraps it in a savepoint
