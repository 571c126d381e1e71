"""commit.pushed off the ingest transaction: the shas of a batch are looked up in their clones before the
transaction opens, in a worker thread, one `git cat-file --batch-check` per repository (a real git
repository); the handler answers from that, and a sha not there yet still waits (Retry)."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from fixtures.curator import GitRepo

import academyd.curator.git as gitsrc
import handlers.commit_pushed
from academyd.ingest import Inbound, Ingestor
from academyd.settings import load_settings
from academyd.store import Store
from handlers import Ack, Retry


def pushed(i: int, repo: str, sha: str) -> Inbound:
    body = {"schema_version": 1, "event_id": f"ev-commit-{i}", "repo": repo, "sha": sha, "branch": "main"}
    return Inbound("commit.pushed", json.dumps(body).encode(), stream_seq=i)


async def test_a_batch_of_pushes_is_one_lookup_outside_the_transaction(tmp_path, monkeypatch) -> None:
    repo = GitRepo(tmp_path / "venom")
    shas = [repo.commit(f"change {i}", {"f.txt": str(i)}) for i in range(20)]
    settings = load_settings(None, data_dir=tmp_path / "data", repos={"venom": str(repo.path)})
    settings.data_dir.mkdir(parents=True)
    store = Store.open(settings.db_path)
    ingestor = Ingestor(store, settings)
    lookups: list[dict[str, Any]] = []
    real = gitsrc.existing_commits

    def counted(clone: Any, wanted: list[str]) -> dict[str, str]:
        lookups.append({"n": len(wanted), "thread": threading.current_thread() is threading.main_thread(),
                        "in_transaction": store.conn.in_transaction})
        return real(clone, wanted)

    def no_git_inside(*_: Any) -> bool:
        raise AssertionError("a git process inside the ingest transaction")

    monkeypatch.setattr(gitsrc, "existing_commits", counted)
    monkeypatch.setattr(handlers.commit_pushed, "commit_available", no_git_inside)
    batch = [pushed(i, "venom", sha) for i, sha in enumerate(shas)]
    batch.append(pushed(99, "venom", "f" * 40))  # pushed, not fetched into the clone yet
    result = await ingestor.process_async(batch, datetime(2026, 11, 25, 12, tzinfo=UTC))

    assert lookups == [{"n": 21, "thread": False, "in_transaction": False}]
    assert result.outcomes[:20] == [Ack()] * 20 and isinstance(result.outcomes[20], Retry)
    assert store.counts()["commit.pushed"] == 20
    store.close()


@pytest.mark.parametrize("sha", ["a" * 40, "abc1234"])
def test_the_sync_path_still_asks_git(tmp_path, sha: str) -> None:
    repo = GitRepo(tmp_path / "venom")
    real = repo.commit("one", {"f.txt": "1"})
    settings = load_settings(None, data_dir=tmp_path / "data", repos={"venom": str(repo.path)})
    settings.data_dir.mkdir(parents=True)
    store = Store.open(settings.db_path)
    result = Ingestor(store, settings).process([pushed(1, "venom", real), pushed(2, "venom", sha)],
                                               datetime(2026, 11, 25, 12, tzinfo=UTC))
    assert result.outcomes[0] == Ack() and isinstance(result.outcomes[1], Retry)
    store.close()
