"""One message costs only itself: hostile payloads inside batches of good lessons, and a handler that raises,
against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from academyd.app import App
from fixtures.nats import lesson, wait_for


def hostile(i: int) -> list[tuple[bytes, str]]:
    """(payload, expected DLQ reason): what the world sends that a parser or a validator chokes on."""
    good = json.dumps(lesson(90_000 + i)).encode()
    deep = b'{"schema_version": 1, "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return [
        (deep, "undecodable"),  # json.loads raises RecursionError while the rejection is explained
        (good.replace(b'"Situation', b'"\xff\xfe Situation'), "undecodable"),  # invalid UTF-8
        (b"[" + good + b"]", "not_object"),  # a JSON array
        (b'"just a string"', "not_object"),  # a bare JSON string
        (good.replace(b'"metadata": {}', b'"metadata": {"score": NaN}'), "not_json"),  # NaN is not JSON
        (good.replace(b'"metadata": {}', b'"metadata": {"n": 1' + b"7" * 5000 + b"}"), "undecodable"),  # int limit
        (good.replace(b'"Situation', b'"\x00 Situation'), "not_json"),  # a raw NUL byte
        (good.replace(b'"Situation', b'"\\u0000 Situation'), "nul_character"),  # an escaped NUL
        (good.replace(b'"result": ', b'"result": "Porazka", "result": '), "duplicate_key"),
        (json.dumps(lesson(90_500 + i, situation="x" * 900_000)).encode(), "schema_violation"),  # < 1 MiB
        (b"\xef\xbb\xbf" + good, "not_json"),  # a byte-order mark
        (b"", "not_json"),  # empty
    ]


async def test_hostile_messages_in_good_batches_cost_only_themselves(make_settings, nc) -> None:
    app = App(make_settings(nats={"fetch_batch": 40}))
    await app.start()
    try:
        js = nc.jetstream()
        poison = hostile(0)
        good_n = 100
        ops: list[tuple[bytes, str | None]] = []
        for i in range(good_n):
            ops.append((json.dumps(lesson(i)).encode(), None))
            if i % 8 == 3 and poison:  # spread over every batch, between good lessons
                ops.append(poison.pop())
        ops += [(p, r) for p, r in poison]
        expected_reasons: dict[str, int] = {}
        for data, reason in ops:
            await js.publish("lesson.created", data)
            if reason:
                expected_reasons[reason] = expected_reasons.get(reason, 0) + 1
        n_bad = sum(expected_reasons.values())
        assert n_bad == 12

        t0 = time.monotonic()
        task = asyncio.create_task(app.consume())
        store = app.store
        await wait_for(lambda: store.counts()["lesson.created"] == good_n and store.dlq_count() == n_bad, timeout=10)
        assert time.monotonic() - t0 < 10
        await asyncio.sleep(1.0)  # a redelivery would show now
        assert store.counts()["lesson.created"] == good_n
        assert store.scalar("SELECT COUNT(DISTINCT lesson_id) FROM lessons") == good_n
        assert store.dlq_by_reason() == expected_reasons
        for row in store.recent_dlq(100):
            assert row["detail"], row
        assert {r["detail"].split(":")[0] for r in store.recent_dlq(100) if r["reason"] == "undecodable"} >= {
            "RecursionError", "UnicodeDecodeError", "ValueError"}

        # No redelivery storm: every message was delivered exactly once, and nothing is left unacked.
        assert app.bus.stats.fetched == good_n + n_bad
        info = await js.consumer_info("ACADEMY_INBOUND", "academyd")
        assert info.num_redelivered == 0 and info.num_ack_pending == 0 and info.num_pending == 0

        # Every hostile message is on the DLQ stream, once, with its reason in the headers.
        dlq = await js.pull_subscribe("academy.dlq.>", durable="t-dlq", stream="ACADEMY_DLQ")
        got: list[Any] = []
        while len(got) < n_bad:
            got += await dlq.fetch(n_bad, timeout=5)
        reasons: dict[str, int] = {}
        for m in got:
            reasons[m.headers["Academy-Reason"]] = reasons.get(m.headers["Academy-Reason"], 0) + 1
            assert m.subject == "academy.dlq.lesson.created"
        assert reasons == expected_reasons
        assert (await js.stream_info("ACADEMY_DLQ")).state.messages == n_bad
        app.request_stop("test")
        await task
    finally:
        await app.stop()


async def test_a_handler_that_raises_on_one_message_dead_letters_it_after_its_tries(make_settings, nc) -> None:
    from handlers import lesson_created, registry

    def flaky(event: Any, ctx: Any) -> Any:
        if event.lesson_id == "lesson-7":
            raise KeyError("the bug that meets lesson 7")
        return lesson_created.handle(event, ctx)

    settings = make_settings(nats={"fetch_batch": 20, "max_deliver": 3, "backoff_s": [0.5, 0.5]})
    app = App(settings)
    await app.start()
    try:
        assert app.ingestor is not None
        app.ingestor.handlers = {**registry(), "lesson.created": flaky}
        js = nc.jetstream()
        for i in range(50):
            await js.publish("lesson.created", json.dumps(lesson(i)).encode(), headers={"Nats-Msg-Id": f"ev-{i}"})
        task = asyncio.create_task(app.consume())
        store = app.store
        await wait_for(lambda: store.dlq_count() == 1, timeout=15)
        row = store.recent_dlq(1)[0]
        assert row["reason"] == "handler_error" and row["detail"].startswith("KeyError"), row
        assert row["event_id"] == "ev-7"
        assert "after 3 tries" in row["detail"]
        assert store.counts()["lesson.created"] == 49
        assert not store.scalar("SELECT COUNT(*) FROM lessons WHERE lesson_id='lesson-7'")
        assert not store.scalar("SELECT COUNT(*) FROM inbox WHERE event_id='ev-7'"), "no partial rows"
        # Its tries, no more: 50 first deliveries + 2 redeliveries of lesson 7.
        await asyncio.sleep(1.0)
        assert app.bus.stats.fetched == 52
        info = await js.consumer_info("ACADEMY_INBOUND", "academyd")
        assert info.num_ack_pending == 0 and info.num_pending == 0
        app.request_stop("test")
        await task
    finally:
        await app.stop()


async def test_a_message_the_server_stops_delivering_is_dead_lettered_from_the_advisory(make_settings, nc) -> None:
    """The backstop: a message that never got an outcome (here another process of the same consumer fetched
    it and died on it, every time) reaches the server's max_deliver; the MAX_DELIVERIES advisory makes the
    daemon read it by sequence and dead-letter it, once."""
    settings = make_settings(nats={"max_deliver": 2, "store_fault_redeliveries": 0, "backoff_s": [],
                                   "ack_wait_s": 1.0})
    app = App(settings)
    await app.start()  # bound and listening for advisories, not consuming
    try:
        js = nc.jetstream()
        await js.publish("lesson.created", json.dumps(lesson(1)).encode(), headers={"Nats-Msg-Id": "ev-lesson-1"})
        await js.publish("lesson.created", b'{"not": "a lesson"', headers={"Nats-Msg-Id": "ev-broken"})
        psub = await js.pull_subscribe_bind(durable="academyd", stream="ACADEMY_INBOUND")
        seen = 0
        for _ in range(3):  # fetched, never acked: the worker "dies" each time
            try:
                seen += len(await psub.fetch(2, timeout=1.5))
            except Exception:
                pass
            await asyncio.sleep(1.2)
        assert seen == 4
        store = app.store
        await wait_for(lambda: store.dlq_count() == 2, timeout=10)
        by_seq = {r["stream_seq"]: r for r in store.recent_dlq(10)}
        assert by_seq[1]["reason"] == "max_deliveries" and by_seq[1]["event_id"] == "ev-lesson-1"
        assert by_seq[2]["reason"] == "not_json"
        await asyncio.sleep(1.0)
        assert (await js.stream_info("ACADEMY_DLQ")).state.messages == 2
        assert app.bus.stats.backstop_dead_lettered == 2
    finally:
        await app.stop()


def test_decode_table_hostile_rejected_and_unusual_but_valid_json_accepted() -> None:
    """The fast path's cheap look (key count, NaN, NUL) only sends payloads to the strict parse; the strict
    parse decides. Valid JSON with odd spacing or quotes in a text must still be accepted."""
    from academyd.ingest import Inbound, decode

    base = lesson(1)
    good = json.dumps(base).encode()

    def reason(data: bytes) -> str | None:
        out = decode(Inbound("lesson.created", data, 1), 1 << 20)
        return getattr(out, "reason", None)

    accepted = [
        good,
        json.dumps(base, separators=(",", ":")).encode(),
        json.dumps(base, indent=2).encode(),
        good.replace(b'"event_id": ', b'"event_id"  :  '),
        json.dumps({**base, "situation": 'he said "stop": then "NaN" and \\u0000 as text'}).encode(),
        json.dumps({**base, "metadata": {"a": {"b": [1, {"c": 2.5}]}, "d": "Infinity"}}).encode(),
    ]
    for data in accepted:
        assert reason(data) is None, data
    rejected = {
        good.replace(b'"metadata": {}', b'"metadata": {"x": [1, Infinity]}'): "not_json",
        good.replace(b'"metadata": {}', b'"metadata": {"x": -Infinity}'): "not_json",
        good.replace(b'"metadata": {}', b'"metadata": {"a": {"k": 1, "k": 2}}'): "duplicate_key",
        good.replace(b'"metadata": {}', b'"metadata": {"k\\u0000": 1}'): "nul_character",
        good.replace(b'"event_id": ', b'"event_id": "x", "event_id": '): "duplicate_key",
    }
    for data, why in rejected.items():
        assert reason(data) == why, (data, reason(data))
