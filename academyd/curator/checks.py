"""The checks file beside a held-out set: what a right answer to each checkable held-out example contains.

One line per checkable held-out example, in the held-out file's order: `{"index", "record", "family",
"question", "reference", "keys"}` (`index` is the example's line in the held-out file). The arena asks
each question through the serving artifact as Venom asks and the gate scores the replies against `keys`
(academyd.arena.answers). Only lessons are checked: their answers name facts; commit messages and task
results have no one right wording.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from academyd.arena.answers import answer_keys, template_words
from academyd.curator.examples import Example


def checks_of(heldout: list[Example], lessons: list[Example], family: dict[str, str]) -> list[dict[str, Any]]:
    answers: dict[str, list[str]] = defaultdict(list)
    for ex in lessons:
        answers[family[ex.key]].append(ex.answer())
    template = template_words(answers.values())
    out: list[dict[str, Any]] = []
    for index, ex in enumerate(heldout):
        if ex.source != "lesson":
            continue
        fid = family[ex.key]
        keys = answer_keys(ex.prompt(), answers[fid], template, explicit=ex.answer_key)
        if keys:
            out.append({"index": index, "record": ex.key, "family": fid, "question": ex.prompt(),
                        "reference": ex.answer(), "keys": keys})
    return out
