"""End to end: a planted corpus in a real store and real git repositories, built into real files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from academyd.cli import main as cli_main
from academyd.curator import build_dataset
from academyd.settings import load_settings
from academyd.store import Store
from fixtures.curator import T0, CorpusStore, Planted, Words, grep_secrets, plant_corpus
from schemas.models import DatasetBuilt

ROOT = Path(__file__).resolve().parents[2]


def _lines(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_planted_corpus_exact_counts_and_no_secret_in_any_file(planted: Planted) -> None:
    r = build_dataset(planted.settings, planted.store, now=T0)
    assert r.refused is None
    assert r.dropped == planted.dropped
    # the records that survived, each once; the training file adds the default's restatements of its lessons
    records = sum(c["train"] + c["replay"] + c["heldout"] for c in r.counts.values())
    assert records == planted.survivors
    manifest = json.loads(Path(r.manifest_path).read_text())
    restated = manifest["augmentation"]["restatements"]
    assert restated > 0 and r.examples == records - r.heldout + restated
    assert grep_secrets(planted.settings.training_dir) == []
    assert manifest["secrets"]["examples_redacted"] == sum(planted.secret_examples.values())
    assert manifest["counts"]["commit"]["dropped"] == 9  # merge, 4 messages, too long, 2 outside, missing
    # every source record has exactly one decision, and lineage names exactly what the files hold
    decisions = _lines(r.decisions_path)
    assert len(decisions) == len({d["record"] for d in decisions}) == sum(c["records"] for c in r.counts.values())
    lineage = manifest["lineage"]
    assert len(lineage["train"]) + restated == len(_lines(r.path)) == r.examples  # records, then restatements
    assert len(lineage["heldout"]) == len(_lines(r.heldout_path)) == r.heldout
    assert not set(lineage["train"]) & set(lineage["heldout"])
    for key in planted.keys["good"] + planted.keys["secret"]:
        assert key in lineage["train"] or key in lineage["heldout"], key
    # redaction left the rest of the example in place
    text = Path(r.path).read_text() + Path(r.heldout_path).read_text()
    assert text.count("<REDACTED>") >= 7 and "git.example.com/venom.git" in text
    # stratified: every source is represented in the held-out set
    assert all(c["heldout"] >= 1 for c in r.counts.values() if c["records"])
    DatasetBuilt.model_validate({"schema_version": 1, "event_id": r.dataset_id, "at": T0, **r.event_payload()})
    assert Path(r.path).name == "dataset_alpaca_20260105_120000.jsonl"
    assert planted.store.latest_dataset()["content_hash"] == r.content_hash


def test_drop_policy_drops_every_example_with_a_secret(planted_drop: Planted) -> None:
    r = build_dataset(planted_drop.settings, planted_drop.store, now=T0)
    assert r.dropped == planted_drop.dropped
    assert r.dropped["secret"] == 7
    assert grep_secrets(planted_drop.settings.training_dir) == []
    assert "<REDACTED>" not in Path(r.path).read_text()


def test_same_store_same_hash_and_heldout_stays_heldout(planted: Planted) -> None:
    first = build_dataset(planted.settings, planted.store, now=T0)
    again = build_dataset(planted.settings, planted.store, now=T0 + timedelta(hours=1))
    assert again.content_hash == first.content_hash and again.path != first.path
    held_before = set(json.loads(Path(first.manifest_path).read_text())["lineage"]["heldout"])
    held_texts = {json.dumps(x, sort_keys=True) for x in _lines(first.heldout_path)}

    # more data, near-copies of held-out lessons, and a smaller fraction: nothing may leak into training
    c = CorpusStore(planted.store, now=T0 + timedelta(days=1), prefix="b2-")
    w = Words(99)
    for _ in range(120):
        c.lesson(w.sentence(16), w.sentence(20), "Sukces ✅ " + w.sentence(5))
    rows = planted.store.conn.execute("SELECT lesson_id, situation, action, result, feedback FROM lessons").fetchall()
    copied = 0
    for lesson_id, situation, action, result, feedback in rows:
        if f"lesson:{lesson_id}" in held_before:
            c.lesson(situation + " again", action, result, feedback=feedback)
            copied += 1
    assert copied >= 1
    planted.settings.curator.heldout_fraction = 0.02
    later = build_dataset(planted.settings, planted.store, now=T0 + timedelta(days=1))
    lineage = json.loads(Path(later.manifest_path).read_text())["lineage"]
    assert held_before <= set(lineage["heldout"])
    assert not held_before & set(lineage["train"])
    assert held_texts <= {json.dumps(x, sort_keys=True) for x in _lines(later.heldout_path)}
    assert later.dropped["near_duplicate"] == 3 + copied
    assert later.examples > first.examples


def test_too_few_examples_is_refused_and_visible(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "data")
    store = Store.open(settings.db_path)
    c = CorpusStore(store)
    w = Words(3)
    for _ in range(30):
        c.lesson(w.sentence(12), w.sentence(12), "Sukces")
    for _ in range(30):
        c.lesson(w.sentence(12), w.sentence(12), "porażka")
    r = build_dataset(settings, store, now=T0)
    # the default restates every lesson (curator.augment): ~100 rows, still 30 lessons, still too few
    assert settings.curator.augment
    assert r.refused and "only 30 examples" in r.refused and "curator.min_examples" in r.refused
    assert r.dropped == {"failure": 30}
    assert not settings.training_dir.exists() or not any(settings.training_dir.iterdir())
    assert store.latest_dataset()["refused"] == r.refused
    store.close()


def test_scope_new_with_replay(planted: Planted) -> None:
    build_dataset(planted.settings, planted.store, now=T0)
    c = CorpusStore(planted.store, now=T0 + timedelta(days=1), prefix="b2-")
    w = Words(5)
    for _ in range(60):
        c.lesson(w.sentence(16), w.sentence(20), "Sukces " + w.sentence(5))
    planted.settings.curator.scope = "new"
    planted.settings.curator.replay_fraction = 0.25
    r = build_dataset(planted.settings, planted.store, now=T0 + timedelta(days=1))
    new_train = sum(c["train"] for c in r.counts.values())  # new records (their restatements not counted)
    assert r.replay == round(0.25 * new_train) and new_train >= 45
    lineage = json.loads(Path(r.manifest_path).read_text())["lineage"]
    assert len(lineage["replay"]) == r.replay and not set(lineage["replay"]) & set(lineage["heldout"])


def test_cli_build_and_backfill(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from fixtures.curator import GitRepo

    repo = GitRepo(tmp_path / "r")
    w = Words(11)
    for i in range(70):
        repo.commit(f"Teach the agent {w.sentence(5).lower()}", {f"f{i}.py": "\n".join(w.sentence(8) for _ in range(5))})
    repo.git("checkout", "-q", "-b", "side")
    repo.commit("Add the side feature for planner tests", {"side.py": w.sentence(30)})
    repo.git("checkout", "-q", "main")
    repo.commit("Add the main feature for planner tests", {"main.py": w.sentence(30)})
    repo.merge("side", "Merge branch 'side'")
    config = tmp_path / "academy.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[repos]\nvenom = "{repo.path}"\n')
    assert cli_main(["dataset", "backfill-git", "nope", "--config", str(config)]) == 2
    assert "not in the allowlist" in capsys.readouterr().err
    assert cli_main(["dataset", "backfill-git", "venom", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["commits"] == 73 and out["added"] == 73
    assert cli_main(["dataset", "backfill-git", "venom", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == 0
    assert cli_main(["dataset", "build", "--config", str(config), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["dropped"] == {"merge_commit": 1} and built["examples"] + built["heldout"] == 72
    store = Store.open(tmp_path / "data" / "academy.db")
    pending = store.conn.execute("SELECT subject, payload FROM outbox").fetchall()
    store.close()
    assert [p[0] for p in pending] == ["academy.dataset.built"]
    assert cli_main(["dataset", "build", "--config", str(config)]) == 0  # tables and progress for people
    assert "dropped, by reason" in capsys.readouterr().out


def test_both_formats_load_with_datasets_and_pass_trl_sft_preparation(tmp_path: Path) -> None:
    trainer_python = ROOT / ".venv-trainer" / "bin" / "python"
    deadline = time.monotonic() + 1800  # the trainer environment may still be installing (make trainer-env)
    while not (ROOT / ".venv-trainer" / ".installed").exists() and time.monotonic() < deadline:
        time.sleep(5)
    args = []
    expected = {}
    for fmt in ("alpaca", "sharegpt"):
        p = plant_corpus(tmp_path / fmt)
        p.settings.curator.format = fmt
        r = build_dataset(p.settings, p.store, now=T0)
        p.store.close()
        args += [fmt, r.path, r.heldout_path]
        expected[fmt] = (r.examples, r.heldout)
    out = subprocess.run([str(trainer_python), str(ROOT / "tests/curator/trl_check.py"), str(tmp_path / "w"), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["format"] for r in reports] == ["alpaca", "sharegpt"]
    for rep in reports:
        train, held = expected[rep["format"]]
        assert (rep["raw_train"], rep["raw_heldout"]) == (train, held)
        assert (rep["train"], rep["heldout"]) == (train, held)  # SFT preparation kept every example
        assert "input_ids" in rep["columns"] and rep["chat_template_used"] and rep["min_tokens"] > 20
    assert sys.executable  # the daemon interpreter never imported torch for this
    assert "torch" not in sys.modules


def test_builds_in_the_same_second_never_overwrite_each_other(planted: Planted) -> None:
    a = build_dataset(planted.settings, planted.store, now=T0)
    planted.settings.curator.min_examples = 10_000
    refused = build_dataset(planted.settings, planted.store, now=T0)
    planted.settings.curator.min_examples = 50
    b = build_dataset(planted.settings, planted.store, now=T0)
    assert len({a.dataset_id, refused.dataset_id, b.dataset_id}) == 3 and a.path != b.path
    assert a.content_hash == b.content_hash and refused.refused
    rows = planted.store.conn.execute("SELECT dataset_id, refused FROM datasets ORDER BY rowid").fetchall()
    assert [r[1] is None for r in rows] == [True, False, True]
