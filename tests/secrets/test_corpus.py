"""The secret scanner measured against real secret shapes, not against detect-secrets (tests/secrets/corpus.jsonl).

Recall: a secret counts as caught only if no 8 characters of it survive redaction. False positive: any
finding at all in a hard negative (hashes, UUIDs, commit shas, base64 data, identifiers, versions).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import make_corpus as mc

from academyd.secrets import Scanner, scanner


def test_the_corpus_is_what_its_seeded_generator_makes() -> None:
    rows = mc.load()
    assert rows == mc.build(), "tests/secrets/corpus.jsonl is stale: run .venv/bin/python tests/secrets/make_corpus.py"
    secrets = [r for r in rows if r["label"] == "secret"]
    assert len(secrets) >= 200 and len({r["kind"] for r in secrets}) >= 20
    assert sum(r["label"] == "negative" for r in rows) >= 200


def test_recall_at_least_99_percent_and_false_positives_at_most_2_percent() -> None:
    per_kind = mc.score(scanner(), mc.load())
    for kind, v in sorted(per_kind.items(), key=lambda kv: (kv[1]["label"], kv[0])):
        rate = 1 - v["bad"] / v["n"] if v["label"] == "secret" else v["bad"] / v["n"]
        print(f"{v['label']:8} {kind:30} n={v['n']:3} {'recall' if v['label'] == 'secret' else 'fp'}={rate:.3f}")
    recall, fp = mc.totals(per_kind)
    print(f"overall recall {recall:.4f}, false positives {fp:.4f}")
    misses = {k: v["examples"][:2] for k, v in per_kind.items() if v["bad"]}
    assert recall >= 0.99, misses
    assert fp <= 0.02, misses


def test_the_prefilter_finds_what_every_rule_on_every_line_finds() -> None:
    texts = [r["text"] for r in mc.load()]
    s = scanner()
    fast = [sorted((f.type, f.value) for f in x) for x in s.find_many(texts)]
    assert fast == [sorted((f.type, f.value) for f in x) for x in s.full_scan(texts)]


def test_one_scanner_per_process_shared_safely_by_threads() -> None:
    """Many threads asking at once get the same scanner, and scanning from all of them at once finds
    exactly what one thread finds (each thread has its own Hyperscan scratch)."""
    got: list[Scanner] = []
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        got.append(scanner())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in got}) == 1
    texts = [r["text"] for r in mc.load()]
    expected = [x[0] for x in scanner().clean_many(texts)]
    with ThreadPoolExecutor(6) as pool:
        runs = list(pool.map(lambda _: [x[0] for x in scanner().clean_many(texts)], range(24)))
    assert all(run == expected for run in runs)


def test_redacting_structured_values_uses_the_key_as_context() -> None:
    s = scanner()
    out = s.redact_obj({"password": "Hunter2!xyz", "note": "fine", "nested": [{"token": "glpat-" + "Ab3" * 8}],
                        "count": 3})
    assert out == {"password": "<REDACTED>", "note": "fine", "nested": [{"token": "<REDACTED>"}], "count": 3}


async def test_the_trainer_is_never_handed_a_dataset_that_holds_a_secret(tmp_path) -> None:
    """A dataset written before the scanner was race-free (2 of 3 builds had GitHub tokens) is refused
    at the start of training, with what to do; a clean one passes."""
    import json
    from types import SimpleNamespace

    import pytest

    from academyd.pipeline import Pipeline, RunFailed

    clean, dirty = tmp_path / "clean.jsonl", tmp_path / "dirty.jsonl"
    rows = [{"instruction": f"Fix the planner retry {i}", "input": "", "output": "Added backoff"} for i in range(50)]
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[17]["output"] = "pushed with GITHUB_TOKEN=ghp_" + "Zq8Rt2Lm9Xw4Vb7Nc1Kd6Hs3Jf5Gp0Ya2Ue8"
    dirty.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = {"run_id": "r1", "dataset_id": "ds-old"}
    await Pipeline._check_inputs(None, run, SimpleNamespace(dataset_path=str(clean), heldout_path=None))  # type: ignore[arg-type]
    with pytest.raises(RunFailed, match="ds-old holds secrets .*GitHub Token.*Build a new dataset"):
        await Pipeline._check_inputs(None, run, SimpleNamespace(dataset_path=str(clean),  # type: ignore[arg-type]
                                                                heldout_path=str(dirty)))
