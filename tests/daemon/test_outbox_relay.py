"""The outbox relay's rules: which publish failures are the row's fault (parked) and which the bus's (an
outage, retried for ever); order per subject behind a parked row; `academyd outbox list|retry`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from fixtures.nats import wait_for

from academyd.cli import main
from academyd.outbox import backoff, classify


def api_error(code: int, err_code: int, description: str) -> nats.js.errors.APIError:
    """The exception nats-py raises for this JetStream error reply."""
    try:
        nats.js.errors.APIError.from_error({"code": code, "err_code": err_code, "description": description})
    except nats.js.errors.APIError as exc:
        return exc
    raise AssertionError("from_error always raises")


@pytest.mark.parametrize(("exc", "no_stream", "kind"), [
    (nats.errors.TimeoutError(), None, "transient"),  # JetStream's ack did not come (no leader, slow disk)
    (asyncio.TimeoutError(), None, "transient"),
    (nats.js.errors.NoStreamResponseError(), None, "transient"),  # nobody answered; JetStream could not say why
    (nats.js.errors.NoStreamResponseError(), False, "transient"),  # a stream captures it: it has no leader now
    (nats.js.errors.NoStreamResponseError(), True, "permanent"),  # JetStream said no stream captures it
    (api_error(503, 10008, "JetStream system temporarily unavailable"), None, "transient"),
    (api_error(503, 10077, "maximum messages exceeded"), None, "transient"),  # a full stream: space may come
    (api_error(409, 10158, "duplicate message id is in process"), None, "transient"),
    (api_error(400, 10054, "message size exceeds maximum allowed"), None, "permanent"),
    (api_error(400, 10060, "expected stream does not match"), None, "permanent"),
    (nats.errors.MaxPayloadError(), None, "permanent"),
    (nats.errors.ConnectionClosedError(), None, "transient"),
    (ConnectionResetError(), None, "transient"),
    (TypeError("Object of type set is not JSON serializable"), None, "permanent"),
])
def test_classify(exc: BaseException, no_stream: bool | None, kind: str) -> None:
    assert classify(exc, no_stream=no_stream) == kind


@pytest.mark.parametrize(("failures", "wait"), [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0),
                                                (1000, 30.0)])
def test_backoff_doubles_up_to_the_cap(failures: int, wait: float) -> None:
    assert backoff(failures, 1.0, 30.0) == wait


def printed(out: str) -> Any:
    """The JSON document a command printed (the in-process daemon's log lines share stdout)."""
    return json.loads(out[out.index("{\n"):])


POISON = "x" * (9 * 1024 * 1024)  # over the server's max_payload (8 MB): refused every time


async def test_a_parked_row_holds_back_its_subject_only_and_the_cli_lists_and_retries_it(
    make_settings, start_daemon, nc, clock, capsys
) -> None:
    settings = make_settings(outbox={"max_attempts": 2})
    d = await start_daemon(settings)
    app, store = d.app, d.app.store
    got: list[str] = []

    async def cb(msg: Any) -> None:
        got.append(json.loads(msg.data)["event_id"])

    await nc.subscribe("academy.dataset.>", cb=cb)
    await nc.subscribe("academy.training.>", cb=cb)
    await nc.flush()
    base = {"schema_version": 1, "at": "2026-11-25T12:00:00+00:00", "dataset_id": "ds", "examples": 1}
    with store.transaction():
        store.outbox_add("academy.dataset.built", {**base, "event_id": "poison", "note": POISON}, "poison", clock())
        store.outbox_add("academy.dataset.built", {**base, "event_id": "behind"}, "behind", clock())
    started = app.evaluate("test", force=True, reason="another subject")
    for _ in range(3):
        await app.relay.flush()
    await wait_for(lambda: started["run_id"] in got, timeout=10)
    assert store.outbox_counts() == {"pending": 1, "parked": 1}
    await asyncio.sleep(0.3)
    assert "behind" not in got and "poison" not in got  # order per subject: it waits behind the parked row
    assert app.health.ok  # a refused row is the row's problem, not an outage

    argv = ["--data-dir", str(settings.data_dir)]
    assert main(["outbox", "list", "--json", *argv]) == 0
    listed = printed(capsys.readouterr().out)
    assert listed["counts"] == {"pending": 1, "parked": 1}
    (row,) = listed["rows"]
    assert row["msg_id"] == "poison" and row["parked_at"] and row["attempts"] == 2
    assert "payload" in row["last_error"].lower()

    assert main(["outbox", "retry", "--json", str(row["id"] + 100), *argv]) == 1
    capsys.readouterr()
    assert main(["outbox", "retry", "--json", str(row["id"]), *argv]) == 0
    assert printed(capsys.readouterr().out) == {"ok": True, "unparked": 1}
    assert store.outbox_counts() == {"pending": 2, "parked": 0}
    # Refused again; the row behind it still waits (the operator sees it parked again, with its error).
    for _ in range(3):
        await app.relay.flush()
    assert store.outbox_counts() == {"pending": 1, "parked": 1} and "behind" not in got
