"""Attribution (#20): which version served a task, its status moving forward, thumbs as its outcome, and the
watch's guardrails. Real SQLite through the ingestor's own path (decode, handler, one transaction)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from academyd.attribution import BASE, served_version
from academyd.champion.assess import assess, guardrails
from academyd.ingest import Inbound, Ingestor
from academyd.settings import Settings, WatchSettings
from academyd.store import Store

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def runtime(applied: bool, adapter: str | None = None) -> dict[str, Any]:
    """Venom's `context_history.llm_runtime`, as it records it (shared/venom/academy-api.md)."""
    return {"llm_runtime": {"provider": "ollama", "model": f"venom-adapter-{adapter}" if adapter else "smollm2:135m",
                            "endpoint": "http://127.0.0.1:11434", "config_hash": "abc", "runtime_id": "ollama",
                            "adapter_applied": applied, "adapter_id": adapter, "status": "ready"}}


@pytest.mark.parametrize(("model_version", "history", "served"), [
    (None, runtime(True, "v2"), "v2"),
    (None, runtime(False), BASE),                       # the base is a version of its own
    ("v7", runtime(True, "v2"), "v7"),                  # a publisher's own model_version wins
    (None, {"llm_runtime": {"adapter_applied": True, "adapter_id": None, "model": "venom-adapter-v3"}}, "v3"),
    (None, {}, None),                                   # Venom's default context: unknown, not counted
    (None, None, None),
    (None, [{"role": "user"}], None),                   # a list of turns (accepted by the schema)
    (None, {"llm_runtime": "ollama"}, None),
])
def test_served_version(model_version: str | None, history: Any, served: str | None) -> None:
    assert served_version(model_version, history) == served


def task(tid: str, status: str, *, eid: str | None = None, result: str | None = "done", history: Any = None,
         version: str | None = None) -> Inbound:
    body = {"schema_version": 1, "event_id": eid or f"ev-{tid}-{status}", "id": tid, "content": f"do {tid}",
            "status": status, "result": result, "logs": [], "context_history": history}
    if version:
        body["model_version"] = version
    return Inbound("task.completed", json.dumps(body).encode(), None)


def thumb(tid: str, rating: str, n: int = 0) -> Inbound:
    body = {"schema_version": 1, "event_id": f"fb-{tid}-{n}", "task_id": tid, "rating": rating,
            "timestamp": "2026-03-01T12:00:00", "comment": None, "prompt": "p", "result": "r", "intent": "chat",
            "tool_required": False}
    return Inbound("feedback.given", json.dumps(body).encode(), None)


@pytest.fixture
def ingest(tmp_path: Path) -> tuple[Store, Ingestor]:
    settings = Settings(data_dir=tmp_path)
    store = Store.open(tmp_path / "academy.db")
    return store, Ingestor(store, settings)


def test_status_moves_forward_and_never_back(ingest: tuple[Store, Ingestor]) -> None:
    store, ing = ingest
    h = runtime(True, "v1")
    r = ing.process([task("t1", "PENDING", result=None), task("t1", "PROCESSING", result=None)], NOW)
    assert [o.duplicate for o in r.outcomes] == [False, False]
    row = store.conn.execute("SELECT status, done_seq FROM tasks WHERE task_id='t1'").fetchone()
    assert (row["status"], row["done_seq"]) == ("PROCESSING", None)  # not finished: no outcome yet
    assert store.served_outcomes("v1", thumbs=True) == []
    ing.process([task("t1", "COMPLETED", history=h)], NOW)
    # a late PROCESSING (redelivered, or read from an older state_dump) and a replayed event change nothing
    r = ing.process([task("t1", "PROCESSING", eid="ev-t1-late"), task("t1", "COMPLETED", history=h)], NOW)
    assert [o.duplicate for o in r.outcomes] == [True, True]
    rows = store.conn.execute("SELECT status, success, served_version, done_seq FROM tasks").fetchall()
    assert [tuple(x) for x in rows] == [("COMPLETED", 1, "v1", 1)]
    # the first FAILED of another task stays FAILED (COMPLETED and FAILED are both final)
    ing.process([task("t2", "FAILED", result=None, history=h), task("t2", "COMPLETED", eid="x", history=h)], NOW)
    assert [o["ok"] for o in store.served_outcomes("v1", thumbs=True)] == [True, False]
    assert store.served_outcomes("v1", thumbs=True)[1]["empty"]


def test_thumbs_override_the_status_when_set(ingest: tuple[Store, Ingestor]) -> None:
    store, ing = ingest
    h = runtime(False)
    ing.process([thumb("a", "down"),  # a thumb may come before its task
                 task("a", "COMPLETED", history=h), task("b", "COMPLETED", history=h),
                 task("c", "FAILED", history=h), thumb("c", "up"), thumb("b", "up"), thumb("b", "down", 1)], NOW)
    assert [(o["task_id"], o["ok"], o["thumb"]) for o in store.served_outcomes(BASE, thumbs=True)] == [
        ("a", False, "down"), ("b", False, "down"), ("c", True, "up")]  # the latest thumb wins
    assert [o["ok"] for o in store.served_outcomes(BASE, thumbs=False)] == [True, True, False]
    assert store.attribution_counts()["base"] == {"tasks": 3, "successes": 2, "thumbs_up": 2, "thumbs_down": 2}


def outcome(i: int, ok: bool = True, *, empty: bool = False, leak: bool = False) -> dict[str, Any]:
    return {"task_id": f"t{i}", "ok": ok, "failed": not ok, "empty": empty, "leak": leak, "thumb": None}


@pytest.mark.parametrize(("tasks", "tripped"), [
    ([outcome(i) for i in range(50)], None),
    ([outcome(i, i % 2 == 0) for i in range(50)], None),                             # failures, not in a run
    ([outcome(i, i < 20 or i >= 30) for i in range(50)], ("failed_run", 30)),        # 10 failed in a row
    ([outcome(i, empty=20 <= i < 30) for i in range(50)], ("failed_run", 30)),       # 10 empty answers
    ([outcome(i, leak=i == 7) for i in range(50)], ("template_leak", 8)),
])
def test_guardrails(tasks: list[dict[str, Any]], tripped: tuple[str, int] | None) -> None:
    got = guardrails(tasks, WatchSettings())
    assert (got[:2] if got else None) == tripped


def test_a_guardrail_acts_before_any_statistics() -> None:
    parent = [outcome(i, i % 5 != 0) for i in range(300)]
    leaky = [outcome(0), outcome(1, leak=True)]
    a = assess("v2", "v1", leaky, parent, WatchSettings())
    assert (a.state, a.cause, a.at_task) == ("rolled_back", "template_leak", 2)
    a = assess("v2", "v1", [outcome(i) for i in range(5)], parent, WatchSettings())
    assert a.state == "watching" and "watching (5 tasks)" in a.reason
    assert a.stats["series"][-1]["task"] == 5 and a.stats["parent_rate"] == pytest.approx(0.8)


def test_approved_answers_are_a_curation_source(ingest: tuple[Store, Ingestor]) -> None:
    from academyd.curator import sources

    store, ing = ingest
    body = {"schema_version": 1, "event_id": "venom-approved-1", "task_id": "t1", "prompt": " Napisz haiku ",
            "approved_response": "Cisza w konsoli", "timestamp": "2026-11-01T10:00:00", "intent": "chat",
            "prompt_hash": "abc", "note": None}
    data = json.dumps(body).encode()
    r = ing.process([Inbound("prompt.approved", data, None), Inbound("prompt.approved", data, None)], NOW)
    assert [o.duplicate for o in r.outcomes] == [False, True]
    (ex,) = sources.approved(store, Settings(data_dir=store.path.parent).curator)
    assert (ex.source, ex.key, ex.turns) == ("approved", "approved:t1", [("human", "Napisz haiku"),
                                                                          ("gpt", "Cisza w konsoli")])


def test_an_unfinished_task_is_dropped_as_unfinished_not_as_a_failure(ingest: tuple[Store, Ingestor]) -> None:
    from academyd.curator import sources

    store, ing = ingest
    ing.process([task("p", "PROCESSING", result=None), task("f", "FAILED"), task("c", "COMPLETED")], NOW)
    got = {i.key: getattr(i, "reason", "example") for i in sources.tasks(store, Settings(data_dir=store.path.parent).curator)}
    assert got == {"task:p": "unfinished", "task:f": "failure", "task:c": "example"}
