"""Run states and the transitions the pipeline may make between them (a written rule, table-tested).

    requested -> curating -> training -> evaluating -> succeeded
    any active state -> failed | refused

An active state may be re-entered (a restarted daemon redoes curation, a re-attached job records its
reference again). Terminal states are final. `Store.move_run` applies a transition as a compare-and-swap
on the state it read, so two writers racing on one run make one move and the other is refused.
"""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    REQUESTED = "requested"
    CURATING = "curating"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"


ACTIVE = frozenset({RunState.REQUESTED, RunState.CURATING, RunState.TRAINING, RunState.EVALUATING})
TERMINAL = frozenset(RunState) - ACTIVE
_ENDINGS = {RunState.FAILED, RunState.REFUSED}
ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.REQUESTED: frozenset({RunState.CURATING, *_ENDINGS}),
    RunState.CURATING: frozenset({RunState.CURATING, RunState.TRAINING, *_ENDINGS}),
    RunState.TRAINING: frozenset({RunState.TRAINING, RunState.EVALUATING, *_ENDINGS}),
    RunState.EVALUATING: frozenset({RunState.EVALUATING, RunState.SUCCEEDED, *_ENDINGS}),
    **{s: frozenset() for s in TERMINAL},
}


class IllegalTransition(Exception):
    """The run is not in a state this move may start from; the message says which."""


def allowed(current: str, to: str) -> bool:
    return RunState(to) in ALLOWED[RunState(current)]
