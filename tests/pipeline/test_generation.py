"""The desired serving state's generation (#19): written in each champion move's transaction, carried by the
events that move queues, increased by every promote and rollback and by nothing else. Real SQLite, the real
registry and moves; small adapter files (no GGUF export: arena.gguf off)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from academyd.champion.errors import StaleChampion
from academyd.champion.moves import promote, rollback
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store
from schemas.models import ModelPromoted, ModelRolledBack

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Settings, Store]:
    settings = Settings(data_dir=tmp_path / "data", arena={"gguf": False})
    store = Store.open(settings.db_path)
    store.migrate()
    return settings, store


def candidate(settings: Settings, store: Store, i: int) -> str:
    src = settings.data_dir / "runs" / f"run-{i}" / "adapter"
    src.mkdir(parents=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": i}))
    (src / "adapter_model.safetensors").write_bytes(bytes([i]) * 64)
    return str(Registry(store, settings).add_candidate(
        run_id=f"run-{i}", adapter_src=src, run_summary={"render": "chat"}, dataset=None,
        base_model=settings.training.base_model, now=NOW)["version"])


def queued(store: Store) -> list[tuple[str, int | None]]:
    rows = store.conn.execute("SELECT subject, payload FROM outbox ORDER BY id").fetchall()
    return [(r[0], json.loads(r[1]).get("generation")) for r in rows if r[0].startswith("model.")]


async def test_every_move_increases_the_generation_and_both_events_of_a_rollback_carry_it(
        setup: tuple[Settings, Store]) -> None:
    settings, store = setup
    assert store.champion_generation() == 0
    v1 = candidate(settings, store, 1)
    assert (await promote(store, settings, v1, reason="t", now=NOW))["generation"] == 1
    v2 = candidate(settings, store, 2)
    with pytest.raises(StaleChampion):  # a move decided against another champion changes nothing
        await promote(store, settings, v2, reason="t", now=NOW, expected_champion=None)
    assert store.champion_generation() == 1
    assert (await promote(store, settings, v2, reason="t", now=NOW))["generation"] == 2
    back = await rollback(store, settings, reason="t", now=NOW)
    assert back["generation"] == back["promoted"]["generation"] == 3 and back["to_version"] == "v1"
    base = await rollback(store, settings, reason="t", now=NOW)
    assert base["generation"] == 4 and base["to_version"] is None
    assert queued(store) == [("model.promoted", 1), ("model.promoted", 2), ("model.rolled_back", 3),
                             ("model.promoted", 3), ("model.rolled_back", 4)]
    assert store.champion_generation() == 4


def test_events_of_an_older_daemon_without_a_generation_stay_valid() -> None:
    old = {"schema_version": 1, "event_id": "promoted-v1-1", "at": "2026-11-01T00:00:00Z", "version": "v1",
           "base_model": "smollm2-135m-instruct", "adapter_path": "/x/models/v1/adapter", "adapter_sha256": "ab" * 32,
           "modelfile_path": "/x/models/v1/Modelfile", "ollama_model": "venom-adapter-v1", "reason": "t"}
    assert ModelPromoted.model_validate(old).generation is None
    assert ModelRolledBack.model_validate({"schema_version": 1, "event_id": "rb-1", "at": "2026-11-01T00:00:00Z",
                                           "from_version": "v1", "to_version": None, "reason": "t"}).generation is None
    with pytest.raises(ValueError):
        ModelPromoted.model_validate({**old, "generation": 0})
