"""`academyd dataset backfill-git REPO`: an allowlisted repository's history as commit records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from academyd.curator import git as gitsrc
from academyd.settings import Settings
from academyd.store import Store
from schemas.models import CommitPushed


@dataclass(frozen=True)
class BackfillResult:
    repo: str
    branch: str
    commits: int
    added: int
    already_known: int


def backfill_git(settings: Settings, store: Store, name: str, *, now: datetime, rev: str = "HEAD") -> BackfillResult:
    """Record every commit reachable from `rev` as if `commit.pushed` had arrived (idempotent).

    Raises RepoNotAllowed for a name outside the allowlist; nothing outside it is opened.
    """
    path = gitsrc.resolve_repo({k: Path(v) for k, v in settings.repos.items()}, name)
    repo = gitsrc.open_repo(path)
    with repo:
        branch = gitsrc.current_branch(repo)
        entries = list(gitsrc.walk_history(repo, rev))
    added = 0
    safe = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in name)
    with store.transaction():
        for e in entries:
            ev = CommitPushed(
                schema_version=1,
                event_id=f"backfill:{safe}:{e.sha}",
                repo=name,
                sha=e.sha,
                branch=branch,
                message=e.message.splitlines()[0] if e.message else None,
                author=e.author,
                pushed_at=datetime.fromisoformat(e.committed_at) if e.committed_at else None,
            )
            if store.claim(ev.event_id, "commit.pushed", None, now) and store.insert_commit(ev, now):
                added += 1
    return BackfillResult(name, branch, len(entries), added, len(entries) - added)
