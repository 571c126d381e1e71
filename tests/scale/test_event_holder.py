"""Progress is taken only from the lease holder (academyd.habitat.nats.holder_verdict): an event of another
worker, or of an earlier attempt (a fenced worker, an orphaned trainer), is dropped; one of a later attempt
waits until the daemon has read the lease that names it."""

from __future__ import annotations

import pytest

from academyd.habitat.nats import AHEAD, holder_verdict
from academyd.worker.protocol import ForwardedEvent, Lease

LEASE = Lease.build(run_id="run-1", worker="w1", state="training", attempt=2)


@pytest.mark.parametrize(("worker", "attempt", "lease", "verdict"), [
    ("w1", 2, LEASE, None),                                   # the holder
    ("w2", 2, LEASE, "not the lease holder"),                 # another worker claiming the holder's attempt
    ("w1", 1, LEASE, "from attempt 1"),                       # the holder's own earlier attempt
    ("w2", 1, LEASE, "from attempt 1"),                       # the fenced/killed earlier holder
    ("w2", 3, LEASE, AHEAD),                                  # a takeover the daemon has not read yet
    ("w1", 1, None, AHEAD),                                   # no lease read yet
    ("w1", 2, LEASE.changed(state="released"), None),         # the holder that gave it back
])
def test_only_the_lease_holder_s_events_count(worker: str, attempt: int, lease: Lease | None,
                                               verdict: str | None) -> None:
    body = ForwardedEvent.build(run_id="run-1", worker=worker, attempt=attempt,
                                event={"type": "progress", "time": 1.0, "step": 3})
    got = holder_verdict(body, lease)
    assert got == verdict if verdict in (None, AHEAD) else (got is not None and verdict in got and got != AHEAD)
