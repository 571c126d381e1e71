"""Ingest that loses nothing and doubles nothing, with poison messages dead-lettered, on a real server."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from fixtures.nats import lesson, publish, wait_for


def malformed(i: int) -> tuple[str, bytes, str]:
    """(subject, payload, expected DLQ reason) — one of each kind of poison, by turns."""
    kind = i % 6
    good = lesson(100_000 + i)
    if kind == 0:
        return "lesson.created", b"this is not json {" + str(i).encode(), "not_json"
    if kind == 1:
        bad = dict(good)
        del bad["situation"]
        return "lesson.created", json.dumps(bad).encode(), "schema_violation"
    if kind == 2:
        return "lesson.created", json.dumps({**good, "schema_version": 2}).encode(), "unknown_schema_version"
    if kind == 3:
        return "lesson.created", json.dumps({**good, "tags": "not-a-list"}).encode(), "schema_violation"
    if kind == 4:
        commit = {"schema_version": 1, "event_id": f"ev-commit-{i}", "repo": "someone-elses-repo",
                  "sha": "a" * 40, "branch": "main"}
        return "commit.pushed", json.dumps(commit).encode(), "repo_not_allowed"
    return "lesson.created", json.dumps({**good, "situation": "x" * (1024 * 1024 + 10)}).encode(), "too_large"


async def test_5000_lessons_with_duplicates_and_poison(make_settings, start_daemon, nc) -> None:
    d = await start_daemon(make_settings(nats={"fetch_batch": 500}))
    js = nc.jetstream()
    rng = random.Random(7)
    n = 5000
    # 10 % re-published: half inside the duplicate window (same Nats-Msg-Id, the server drops them),
    # half as if outside it (no header: the server stores them again; the daemon's inbox must drop them).
    dup_ids = rng.sample(range(n), n // 10)
    poison = [malformed(i) for i in range(n // 50)]
    ops: list[tuple[str, bytes, str | None]] = [
        ("lesson.created", json.dumps(lesson(i)).encode(), f"ev-lesson-{i}") for i in range(n)
    ]
    for j, i in enumerate(dup_ids):
        ops.append(("lesson.created", json.dumps(lesson(i)).encode(), f"ev-lesson-{i}" if j % 2 else None))
    ops += [(subject, data, None) for subject, data, _ in poison]
    rng.shuffle(ops)
    for subject, data, msg_id in ops:
        await publish(js, subject, data, msg_id)

    store = d.app.store
    await wait_for(lambda: store.counts()["lesson.created"] == n and store.dlq_count() == len(poison), timeout=60)
    await asyncio.sleep(1.0)  # anything still in flight would show up now
    assert store.counts()["lesson.created"] == n
    assert store.scalar("SELECT COUNT(*) FROM inbox") == n
    assert store.scalar("SELECT COUNT(DISTINCT lesson_id) FROM lessons") == n
    expected: dict[str, int] = {}
    for _, _, reason in poison:
        expected[reason] = expected.get(reason, 0) + 1
    assert store.dlq_by_reason() == expected

    # Every poison message is on the DLQ stream with its reason in the headers.
    dlq = await js.pull_subscribe("academy.dlq.>", durable="test-dlq", stream="ACADEMY_DLQ")
    got: list[Any] = []
    while len(got) < len(poison):
        got += await dlq.fetch(len(poison), timeout=5)
    reasons: dict[str, int] = {}
    for m in got:
        reasons[m.headers["Academy-Reason"]] = reasons.get(m.headers["Academy-Reason"], 0) + 1
        assert m.subject == f"academy.dlq.{m.headers['Academy-Original-Subject']}"
        assert m.headers["Academy-Detail"]
    assert reasons == expected
    # ...and nothing is left unacknowledged on the inbound consumer.
    info = await js.consumer_info("ACADEMY_INBOUND", "academyd")
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert d.task is not None and not d.task.done(), "the daemon keeps running"


async def test_lesson_resent_under_a_new_event_id_is_kept_once(make_settings, start_daemon, nc) -> None:
    d = await start_daemon(make_settings())
    js = nc.jetstream()
    await publish(js, "lesson.created", lesson(1))
    await publish(js, "lesson.created", lesson(1, event_id="another-event-id"))
    await publish(js, "lesson.created", lesson(2))
    await wait_for(lambda: d.app.store.scalar("SELECT COUNT(*) FROM inbox") == 3)
    assert d.app.store.counts()["lesson.created"] == 2


async def test_dead_letter_excerpts_hold_no_secret(make_settings, start_daemon, nc) -> None:
    d = await start_daemon(make_settings())
    aws = "AKIAIOSFODNN7EXAMPLE"
    token = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    body = lesson(1, situation=f"deploy with {aws} and {token}")
    del body["action"]  # a schema violation: dead-lettered
    await publish(nc.jetstream(), "lesson.created", body)
    await wait_for(lambda: d.app.store.dlq_count() == 1)
    row = d.app.store.recent_dlq(1)[0]
    assert row["reason"] == "schema_violation"
    assert aws not in row["excerpt"] and token not in row["excerpt"]
    assert "deploy with" in row["excerpt"]
