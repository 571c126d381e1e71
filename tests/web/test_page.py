"""The Academy page in Debian's headless Chromium, against a daemon on a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

from fixtures.nats import lesson, publish, wait_for
from fixtures.web import TOKEN, artifact_path, register_version


async def progress_event(js: Any, run_id: str, step: int, total: int, loss: float, **extra: Any) -> None:
    """What a training worker publishes (local or remote): academy.training.progress."""
    body = {"schema_version": 1, "event_id": f"{run_id}-p{step}", "at": "2026-11-25T12:00:00+00:00",
            "run_id": run_id, "step": step, "total_steps": total, "epoch": step / total * 3, "loss": loss,
            "learning_rate": 2e-4 * (1 - step / total), "tokens_per_s": 812.5, "eta_s": (total - step) * 2.0,
            **extra}
    await publish(js, "academy.training.progress", body, body["event_id"])


async def test_page_live_loss_chart_and_token_rule(web_daemon, nc, browser) -> None:
    app = web_daemon.app
    js = nc.jetstream()
    for i in range(37):
        await publish(js, "lesson.created", lesson(i), f"ev-lesson-{i}")
    await publish(js, "lesson.created", b"{not json", "poison-1")
    await publish(js, "commit.pushed", {"schema_version": 1, "event_id": "c1", "repo": "nope", "sha": "zz",
                                        "branch": "main"}, "c1")
    await wait_for(lambda: app.store.counts()["lesson.created"] == 37 and app.store.dlq_count() >= 2)

    page = await browser.new_page(viewport={"width": 1360, "height": 1500})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    await page.goto(app.web.url + "/")
    await page.wait_for_selector("#lessons-big:has-text('37 / 100')")
    await page.wait_for_selector("#live.on")
    await page.wait_for_selector("#dlq-table td .chip")

    # A run starts; progress arrives on the bus as from a worker, and the chart gains points live.
    started = app.evaluate("test", force=True, reason="page test")
    run_id = started["run_id"]
    await page.wait_for_selector(f"#run-id:has-text('{run_id}')")
    total = 40
    for step in range(1, 13):
        await progress_event(js, run_id, step, total, 3.2 * 0.93 ** step)
    await page.wait_for_selector("#chart[data-points='12']", timeout=10_000)
    assert await page.text_content("#k-step") == f"12/{total}"
    for step in range(13, 25):
        await progress_event(js, run_id, step, total, 3.2 * 0.93 ** step, eval_loss=2.5 if step == 20 else None)
    await page.wait_for_selector("#chart[data-points='24']", timeout=10_000)
    assert await page.locator("#chart svg .eval-dot").count() == 1

    assert problems == [], problems

    # State changes need the token: refused without it, accepted after the user types it.
    refused = await page.evaluate(
        """async () => { const r = await fetch('/api/rollback', {method: 'POST', body: '{}',
             headers: {'Content-Type': 'application/json'}}); return [r.status, await r.json()]; }""")
    assert refused[0] == 401 and "token" in refused[1]["error"]
    await asyncio.sleep(0.2)
    assert [p for p in problems if "401 (Unauthorized)" not in p] == [], problems
    problems.clear()
    assert await page.is_disabled("#train-btn")
    await page.fill("#token-input", TOKEN)
    await page.click("#token-save")
    await page.wait_for_selector("#train-btn:not([disabled])")

    # Reload: the ring of recent progress redraws the live chart.
    await page.reload()
    await page.wait_for_selector("#chart[data-points='24']", timeout=10_000)

    # The run ends: its adapter is registered as v1 with the arena's verdict; the user promotes it from
    # the genealogy (with confirmation), and it shows as the champion.
    v1 = register_version(app, run_id, heldout_loss=1.92)
    with app.store.transaction():
        app.store.set_run_state(run_id, "succeeded", app.clock(), version=v1["version"])
    await publish(js, "academy.training.finished", {"schema_version": 1, "event_id": f"{run_id}-done",
                                                    "at": "2026-11-25T12:10:00+00:00", "run_id": run_id,
                                                    "version": "v1", "final_loss": 0.56}, f"{run_id}-done")
    await page.wait_for_selector("#genealogy li[data-version='v1'] .state.candidate")
    await page.click("#models-body button[data-version='v1']")
    await page.wait_for_selector("#confirm[open]")
    await page.fill("#confirm-reason", "looks better")
    await page.click("#confirm-ok")
    await page.wait_for_selector("#genealogy li[data-version='v1'] > .node.champion", timeout=10_000)
    await page.wait_for_selector("#champion-pill:has-text('champion: v1')")
    # no follower runs here: the page says so beside the champion (#19)
    await page.wait_for_selector("#served-pill:has-text('served: not reported yet')")
    assert app.pipeline.status()["champion"] == "v1"
    history = [h["reason"] for h in v1_history(app)]
    assert "looks better" in history[-1]

    # A later candidate the arena rejected hangs under its parent; the dataset view fills in.
    register_version(app, "run-later", heldout_loss=2.4, promote=False)
    app.relay.kick()
    await page.wait_for_selector("#genealogy li[data-version='v1'] li[data-version='v2'] .state.reject")
    built = await app.pipeline.build_dataset(reason="page test")
    assert built.get("ok", True), built
    app.relay.kick()
    await page.wait_for_selector("#dataset-body .hist")

    await page.reload()
    await page.wait_for_selector("#genealogy li[data-version='v2']")
    await page.wait_for_selector(f"#runs-table tr[data-run='{run_id}'] svg.spark path")
    await page.wait_for_selector("#chart[data-points='24']")
    shot = artifact_path("academy-page.png")
    await page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert problems == [], problems


def v1_history(app: Any) -> list[dict[str, Any]]:
    from academyd.registry import Registry

    return Registry(app.store, app.settings).get("v1")["history"]
