"""Replay prompts (pure: no model): both shapes the curator writes, none of them in what the arena measures."""

from __future__ import annotations

import json

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
