"""The outbox under a poison row, on a real nats-server: later events still go out, the row is parked,
counted and visible (academy.status, /metrics, the page); published rows are pruned after retention."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from fixtures.nats import wait_for
from fixtures.web import TOKEN

POISON_BYTES = 9 * 1024 * 1024  # over the server's max_payload (8 MB): the server can never take it


async def test_a_poison_row_is_parked_and_later_events_still_go_out(
    make_settings, start_daemon, nc, clock, browser
) -> None:
    settings = make_settings(http={"enabled": True, "port": 0, "token": TOKEN}, outbox={"max_attempts": 3})
    d = await start_daemon(settings)
    app, store = d.app, d.app.store
    got: list[tuple[str, dict[str, Any]]] = []

    async def cb(msg: Any) -> None:
        got.append((msg.subject, json.loads(msg.data)))

    await nc.subscribe("academy.>", cb=cb)
    await nc.flush()
    # A row no server will ever take, queued the way every event is (inside a transaction), and then a
    # real event behind it: the run a forced training records.
    with store.transaction():
        store.outbox_add("academy.dataset.built", {"schema_version": 1, "event_id": "poison-1",
                                                   "at": "2026-11-25T12:00:00+00:00", "note": "x" * POISON_BYTES},
                         msg_id="poison-1", now=clock())
    app.relay.kick()
    started = app.evaluate("test", force=True, reason="behind the poison row")
    await wait_for(lambda: [p for s, p in got if s == "academy.training.requested"], timeout=10)
    assert [p["run_id"] for s, p in got if s == "academy.training.requested"] == [started["run_id"]]

    # It keeps failing, attempts are counted, and it is parked at the limit with its error.
    for _ in range(4):
        await app.relay.flush()
    await wait_for(lambda: store.outbox_counts()["parked"] == 1, timeout=10)
    parked = app.status()["outbox_parked"]
    assert len(parked) == 1
    assert parked[0]["msg_id"] == "poison-1" and parked[0]["attempts"] == 3
    assert "payload" in parked[0]["last_error"].lower(), parked[0]
    assert app.status()["outbox_pending"] == 0
    assert "poison-1" not in [p.get("event_id") for _, p in got]

    # Still nothing held back: another event after parking goes straight out.
    with store.transaction():
        store.set_run_state(started["run_id"], "failed", clock(), error="test")
    later = app.evaluate("test", force=True, reason="after parking")
    await wait_for(lambda: later["run_id"] in [p["run_id"] for s, p in got if s == "academy.training.requested"])

    # The page shows it with its error; /metrics counts it.
    page = await browser.new_page()
    await page.goto(app.web.url + "/")
    await page.wait_for_selector("#outbox-card:not([hidden]) td:has-text('poison-1')")
    assert "payload" in (await page.text_content("#outbox-table tbody")).lower()
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(app.web.url + "/metrics") as r:
        assert "academy_outbox_parked 1.0" in await r.text()

    # Retention: rows published more than outbox.retention_h ago are deleted; parked ones are kept.
    published = store.scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NOT NULL")
    assert published >= 2
    clock.advance(hours=settings.outbox.retention_h + 1)
    assert app.relay.prune() == published
    assert store.scalar("SELECT COUNT(*) FROM outbox") == 1  # the parked row
    # An operator gives it another round of attempts.
    with store.transaction():
        assert store.outbox_unpark() == 1
    assert store.outbox_counts() == {"pending": 1, "parked": 0}
