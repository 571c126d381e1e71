"""The page's HTTP side against a daemon on a real nats-server: /metrics, the token rule, the views."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fixtures.nats import lesson, publish, wait_for
from fixtures.web import TOKEN, poll

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def scrape(http: Any, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def test_metrics_parse_and_counters_move_with_events(web_daemon, nc, http, clock) -> None:
    app, url = web_daemon.app, web_daemon.app.web.url
    before = await scrape(http, url)
    assert before[("academy_events_ingested_total", (("subject", "lesson.created"),))] == 0
    assert before[("academy_champion_version", ())] == 0
    assert before[("academy_runs_total", (("outcome", "succeeded"),))] == 0
    assert ("academy_consumer_lag", ()) in before
    assert before[("academy_training_duration_seconds_count", ())] == 0

    js = nc.jetstream()
    for i in range(7):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await publish(js, "task.completed", b"[1, 2]", "poison-task")
    await publish(js, "lesson.created", lesson(0), "ev-lesson-0")  # a duplicate (same Nats-Msg-Id window)

    async def moved() -> Any:
        m = await scrape(http, url)
        ok = (m[("academy_events_ingested_total", (("subject", "lesson.created"),))] == 7
              and m.get(("academy_dlq_total", (("reason", "not_object"),))) == 1
              # acks go out right after the commit: the lag reaches 0 a moment after the counts move
              and m.get(("academy_consumer_lag", ())) == 0)
        return m if ok else None

    after = await poll(moved)
    assert after[("academy_new_successful_lessons", ())] == 7
    assert after[("academy_training_threshold_lessons", ())] == 100

    # A run that trained for 90 s and succeeded: the outcome counter and the duration histogram move.
    run_id = app.evaluate("test", force=True)["run_id"]
    store = app.store
    with store.transaction():
        store.set_run_state(run_id, "training", clock())
    m = await scrape(http, url)
    assert m[("academy_run_active", (("state", "training"),))] == 1
    progress = {"schema_version": 1, "event_id": "p1", "at": "2026-11-25T12:00:00+00:00", "run_id": run_id,
                "step": 3, "total_steps": 10, "loss": 2.5}
    await publish(js, "academy.training.progress", progress, "p1")
    m = await poll(_has_loss(http, url, run_id))
    assert m[("academy_training_loss", (("run_id", run_id),))] == 2.5
    assert m[("academy_bus_events_seen_total", (("subject", "academy.training.progress"),))] >= 1
    with store.transaction():
        store.set_run_state(run_id, "succeeded", clock() + timedelta(seconds=90))
    m = await scrape(http, url)
    assert m[("academy_runs_total", (("outcome", "succeeded"),))] == 1
    assert m[("academy_run_active", (("state", "training"),))] == 0
    assert m[("academy_training_duration_seconds_count", ())] == 1
    assert m[("academy_training_duration_seconds_sum", ())] == 90
    assert m[("academy_training_duration_seconds_bucket", (("le", "60.0"),))] == 0
    assert m[("academy_training_duration_seconds_bucket", (("le", "300.0"),))] == 1


def _has_loss(http: Any, url: str, run_id: str) -> Any:
    async def check() -> Any:
        m = await scrape(http, url)
        return m if ("academy_training_loss", (("run_id", run_id),)) in m else None
    return check


async def test_state_changes_need_the_token(web_daemon, http) -> None:
    url = web_daemon.app.web.url
    async with http.post(url + "/api/train", json={"force": True}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in (await r.json())["error"]
    async with http.post(url + "/api/train", json={"force": True}, headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    assert web_daemon.app.store.recent_runs() == []  # nothing changed

    async with http.post(url + "/api/train", json={"force": True, "reason": "api test"}, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
    assert body["started"] is True
    assert web_daemon.app.store.get_run(body["run_id"])["reason"] == "page: api test (forced)"
    async with http.post(url + "/api/train", json={"force": True}, headers=AUTH) as r:
        assert r.status == 409
        assert "active" in (await r.json())["reason"]
    async with http.post(url + "/api/train", json={"force": "yes"}, headers=AUTH) as r:
        assert r.status == 400
    async with http.post(url + "/api/train", data=b"{oops", headers=AUTH) as r:
        assert r.status == 400
    async with http.post(url + "/api/models/latest/promote", json={}, headers=AUTH) as r:
        assert r.status == 400
        assert "v3" in (await r.json())["error"]

    # A page on another site cannot act, token or not; a page reached through another name cannot read.
    async with http.post(url + "/api/rollback", json={}, headers={**AUTH, "Origin": "http://evil.example"}) as r:
        assert r.status == 403
    async with http.get(url + "/api/status", headers={"Host": "evil.example"}) as r:
        assert r.status == 421
    async with http.get(url + "/api/status", headers={"Host": "localhost:1234"}) as r:
        assert r.status == 200


async def test_without_a_token_the_page_is_read_only(make_settings, start_daemon, http) -> None:
    d = await start_daemon(make_settings(http={"enabled": True, "port": 0}))
    url = d.app.web.url
    async with http.post(url + "/api/train", json={"force": True}, headers=AUTH) as r:
        assert r.status == 403
        assert "ACADEMY_HTTP__TOKEN" in (await r.json())["error"]
    async with http.get(url + "/api/status") as r:
        status = await r.json()
    assert status["page"]["state_changes"] == "disabled"
    assert "ACADEMY_HTTP__TOKEN" in status["page"]["hint"]
    async with http.get(url + "/") as r:
        assert r.status == 200
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert "The Academy" in await r.text()
    for asset in ("app.js", "style.css"):
        async with http.get(f"{url}/static/{asset}") as r:
            assert r.status == 200, asset
    assert d.app.store.recent_runs() == []


async def test_views_of_earlier_runs_datasets_and_dead_letters(make_settings, start_daemon, nc, http, clock) -> None:
    settings = make_settings(http={"enabled": True, "port": 0, "token": TOKEN},
                             curator={"min_examples": 5, "heldout_fraction": 0.25})
    d = await start_daemon(settings)
    app, url = d.app, d.app.web.url
    js = nc.jetstream()
    for i in range(30):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await publish(js, "lesson.created", {"schema_version": 1, "event_id": "bad"}, "bad")
    await wait_for(lambda: app.store.counts()["lesson.created"] == 30 and app.store.dlq_count() == 1)

    # An earlier run whose curve the registry kept in models/<version>/loss.jsonl.
    store = app.store
    run_id = app.evaluate("test", force=True)["run_id"]
    with store.transaction():
        store.set_run_state(run_id, "training", clock())
        store.set_run_state(run_id, "succeeded", clock() + timedelta(minutes=3), version="v1")
    curve = settings.models_dir / "v1" / "loss.jsonl"
    curve.parent.mkdir(parents=True)
    curve.write_text("".join(json.dumps({"step": s, "epoch": s / 10, "loss": 3.0 - s * 0.1, "learning_rate": 2e-4})
                             + "\n" for s in range(1, 21)) + '{"step": 21, "lo')  # a line cut by a crash
    async with http.get(url + "/api/runs") as r:
        runs = (await r.json())["runs"]
    assert [(x["run_id"], x["has_loss"], x["duration_s"]) for x in runs] == [(run_id, True, 180.0)]
    async with http.get(f"{url}/api/runs/{run_id}/loss") as r:
        loss = await r.json()
    assert [p["step"] for p in loss["points"]] == list(range(1, 21))
    assert loss["source"].endswith("v1/loss.jsonl")
    async with http.get(url + "/api/runs/run-nope/loss") as r:
        assert r.status == 404

    # The curator's build: examples per source, dropped per reason, held-out size, a length histogram.
    async with http.get(url + "/api/datasets") as r:
        assert (await r.json())["datasets"] == []
    built = await app.pipeline.build_dataset(reason="test")
    assert built.get("ok", True), built
    async with http.get(url + "/api/datasets") as r:
        ds = (await r.json())["datasets"][0]
    assert ds["examples"] > 0 and ds["heldout"] > 0
    # the lessons that survived, each once; the training file adds the default's restatements of them
    assert ds["counts"]["lesson"]["train"] + ds["heldout"] == 30 - sum(ds["dropped"].values())
    assert ds["restatements"] > 0 and ds["examples"] == ds["counts"]["lesson"]["train"] + ds["restatements"]
    hist = ds["length_histogram"]
    assert sum(hist["train"]) == ds["examples"] and sum(hist["heldout"]) == ds["heldout"]

    async with http.get(url + "/api/dlq") as r:
        dlq = await r.json()
    assert dlq["count"] == 1 and dlq["recent"][0]["reason"] == "schema_violation"
    async with http.get(url + "/api/status") as r:
        status = await r.json()
    assert status["last_dataset"]["dataset_id"] == ds["dataset_id"]
