"""Replay prompts (pure: no model): both shapes the curator writes, none of them in what the arena measures;
the replies' cache (generation stood in for: the real one runs in the trainer's environment)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from academyd.arena.contest import GENERAL_SET
from academyd.arena.runtime import GENERAL_PROBES
from academyd.trainer import replay


def test_prompts_come_in_both_shapes_alternating() -> None:
    qs = replay.prompts()
    assert len(qs) >= 80
    shapes = [tuple(m["role"] for m in q) for q in qs]
    assert set(shapes) == {("user",), ("system", "user")}
    # Any prefix (replay uses the first n) holds both shapes.
    assert shapes[0] != shapes[1]
    assert all(m["content"].strip() and replay.SEPARATOR.strip() not in m["content"] for q in qs for m in q)


def test_prompts_overlap_neither_the_general_set_nor_the_probes() -> None:
    general = [json.loads(line) for line in GENERAL_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    measured = {g["instruction"].strip().lower() for g in general} | {g["input"].strip().lower() for g in general}
    measured |= {p.lower() for p in GENERAL_PROBES}
    measured.discard("")
    for q in replay.prompts():
        for m in q:
            assert m["content"].strip().lower() not in measured, q


def test_a_reply_cut_by_the_length_limit_ends_at_its_last_sentence_or_is_dropped() -> None:
    q = [{"role": "system", "content": "Add the numbers."}, {"role": "user", "content": "1 and 2"}]
    row = replay._row(q, "1 + 2 = 3. So the answer is", finished=False)
    assert row["conversations"] == [{"from": "system", "value": "Add the numbers."},
                                    {"from": "human", "value": "1 and 2"}, {"from": "gpt", "value": "1 + 2 = 3."}]
    assert replay._row(q, "no sentence end", finished=False)["conversations"][-1]["value"] == ""
    assert replay._row(q, "whole", finished=True)["conversations"][-1]["value"] == "whole"


def test_the_cache_keeps_a_reply_per_prompt_so_a_larger_run_generates_only_what_it_adds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run's replay size follows its dataset (replay_general x rows): the next run, a few lessons bigger,
    must not generate every reply again (110-144 s of llama.cpp on 2 cores for ~110 prompts)."""
    asked: list[list[str]] = []

    def generate(model_dir: str, tokenizer: Any, qs: list[Any], device: str, max_new: int) -> list[tuple[str, bool]]:
        asked.append([q[-1]["content"] for q in qs])
        return [(f"Reply to {q[-1]['content']}.", True) for q in qs]

    monkeypatch.setattr(replay, "_generate_transformers", generate)
    tok = SimpleNamespace(chat_template="{{ messages }}", eos_token_id=2)

    def rows(n: int) -> list[dict[str, Any]]:
        return replay.replay_examples("model", tok, n, base_sha256="b" * 64, cache_dir=tmp_path)

    first = rows(10)
    assert [len(a) for a in asked] == [10]
    bigger = rows(16)
    assert [len(a) for a in asked] == [10, 6]  # only the 6 prompts it adds
    assert bigger[:10] == first  # the cached replies, the same rows in the same order
    assert asked[1] == [q[-1]["content"] for q in replay.prompts()[10:16]]
    assert rows(12) == bigger[:12] and len(asked) == 2  # smaller: nothing generated
    # A torn last line (a crash mid-write by an older writer): that prompt alone is generated again.
    [cache] = list(tmp_path.glob("replay-*.jsonl"))
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:-1] + [lines[-1][:20]]) + "\n")
    assert rows(16) == bigger and [len(a) for a in asked] == [10, 6, 1]
    # Another base: its own replies, none of this base's.
    other = replay.replay_examples("model", tok, 3, base_sha256="c" * 64, cache_dir=tmp_path)
    assert len(asked) == 4 and len(other) == 3
    assert len(list(tmp_path.glob("replay-*.jsonl"))) == 2
