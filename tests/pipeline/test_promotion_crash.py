"""A daemon that died between a run's automatic promotion and the run's end resumes it correctly: the run
ends `succeeded`, the promotion stands, and the champion is not judged against itself (its verdict, metrics
and evaluated_at stay those it was promoted on; no second academy.evaluation.finished). Real SQLite, the
daemon's own Pipeline, Trigger and Champion; the state is the one the crash leaves in the store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from academyd.champion import Champion
from academyd.events import Outbox
from academyd.pipeline import Pipeline
from academyd.settings import load_settings
from academyd.store import Store
from academyd.trigger import Trigger

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
VERDICT = {"verdict": "promote", "champion": None, "reasons": ["better on held-out data"],
           "metrics": {"candidate_loss": 1.25, "champion_loss": 1.5, "rules": {}}}


async def test_a_crash_after_the_promotion_resumes_without_judging_the_champion_against_itself(tmp_path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data", training={"autorun": False})
    settings.data_dir.mkdir(parents=True)
    store = Store.open(settings.db_path)
    clock = lambda: T0 + timedelta(hours=1)  # noqa: E731
    outbox = Outbox(store)
    trigger = Trigger(settings, store, clock, outbox)
    pipeline = Pipeline(settings, store, clock, outbox, trigger, Champion(store, settings, clock))

    # What the crash leaves: the run evaluating v1, v1 evaluated and promoted (by this run), the run not ended.
    run_id = store.create_run(reason="test", forced=True, new_lessons=0, now=T0)
    with store.transaction():
        store.insert_model(version="v1", seq=1, parent=None, run_id=run_id, base_model="/models/base.gguf",
                           dataset_id=None, dataset_hash=None, dataset_format="alpaca", heldout_path=None,
                           spec_hash=None, backend="peft", packages={}, adapter_path=str(tmp_path / "adapter"),
                           adapter_sha256="0" * 64, now=T0)
        store.set_model_evaluation("v1", metrics=VERDICT["metrics"], verdict=VERDICT, status="candidate", now=T0)
        store.make_champion("v1", {}, T0)
        for state in ("curating", "training", "evaluating"):
            store.move_run(run_id, state, T0, **({"version": "v1"} if state == "evaluating" else {}))
    before = store.get_version("v1")
    evaluations = store.scalar("SELECT COUNT(*) FROM outbox WHERE subject='academy.evaluation.finished'")

    await pipeline.execute(run_id)  # what the restarted daemon's pipeline does with the active run

    run = store.get_run(run_id)
    assert run["state"] == "succeeded", run
    after = store.get_version("v1")
    assert after["status"] == "champion" and store.champion_version() == "v1"
    assert after["metrics"] == before["metrics"] == VERDICT["metrics"]
    assert after["verdict"] == VERDICT and after["evaluated_at"] == before["evaluated_at"]
    assert store.scalar("SELECT COUNT(*) FROM outbox WHERE subject='academy.evaluation.finished'") == evaluations
    store.close()
