"""Which lease records are honoured (academyd.worker.trust.effective_lease): the writer is the record's key
(the identity the server let write it), time is the server's; ack wait 8 s, so fresh is 5 s."""

from __future__ import annotations

from typing import Any

import pytest

from academyd.worker.protocol import DAEMON_WRITER, Lease, Timing
from academyd.worker.trust import Record, effective_lease

T = Timing(8.0)


def rec(writer: str, t: float, **fields: Any) -> Record:
    fields.setdefault("state", "training")
    return Record(writer=writer, seq=int(t * 10), time=t, lease=Lease.build(run_id="r", **fields))


W1 = dict(worker="w1", attempt=1)
W2 = dict(worker="w2", attempt=2)


@pytest.mark.parametrize(("records", "holder", "refused"), [
    ([rec("w1", 0, **W1), rec("w1", 2, **W1)], ("w1", 1, "training"), []),
    # a takeover after 5 s of silence (an honest taker waits 6): honoured
    ([rec("w1", 0, **W1), rec("w2", 6, **W2)], ("w2", 2, "training"), []),
    # a takeover while the holder's heartbeat is fresh: not honoured, whatever it claims
    ([rec("w1", 0, **W1), rec("w2", 3, **W2)], ("w1", 1, "training"), ["heartbeat was fresh"]),
    ([rec("w1", 0, **W1), rec("w2", 3, worker="w2", attempt=2, state="failed")], ("w1", 1, "training"),
     ["heartbeat was fresh"]),
    # a record in another worker's name: not honoured, even late
    ([rec("w1", 0, **W1), rec("w2", 9, worker="w1", attempt=1, state="failed")], ("w1", 1, "training"),
     ["in the name of w1"]),
    # the holder gave it back: taken at once
    ([rec("w1", 0, **W1), rec("w1", 1, state="released", **W1), rec("w2", 1.5, **W2)], ("w2", 2, "training"), []),
    # an earlier attempt, and anything after the end
    ([rec("w1", 0, **W1), rec("w2", 6, **W2), rec("w1", 20, **W1)], ("w2", 2, "training"), ["attempt 1"]),
    ([rec("w1", 0, **W1), rec("w1", 1, state="failed", **W1), rec("w2", 30, worker="w2", attempt=2)],
     ("w1", 1, "failed"), ["after the end"]),
    # the daemon's end of a job nobody holds; the daemon writes nothing else
    ([rec(DAEMON_WRITER, 0, state="cancelled")], (None, 0, "cancelled"), []),
    ([rec(DAEMON_WRITER, 0, state="training", worker="w1", attempt=1)], None, ["only an end"]),
])
def test_only_what_the_holder_s_identity_wrote_in_its_tenure_is_honoured(
        records: list[Record], holder: tuple[Any, int, str] | None, refused: list[str]) -> None:
    v = effective_lease(records, T)
    got = None if v.lease is None else (v.lease.worker, v.lease.attempt, v.lease.state)
    assert got == holder
    assert len(v.refused) == len(refused) and all(w in why for (_, why), w in zip(v.refused, refused, strict=True)), \
        v.refused


def test_a_record_that_is_not_a_lease_is_refused_but_counted() -> None:
    v = effective_lease([Record("mallory", 1, 0.0, None, "invalid: not a valid Lease"), rec("w1", 1, **W1)], T)
    assert v.lease is not None and v.lease.worker == "w1"
    assert [why for _, why in v.refused] == ["invalid: not a valid Lease"]


def test_a_worker_s_id_is_its_identity_s(tmp_path) -> None:
    """`worker-<id>` is worker <id> (its own inbox too); found in the daemon's data directory for `--id`;
    another identity gives no per-worker trust (logged) and keeps the given id."""
    from structlog.testing import capture_logs

    from academyd import nats_auth
    from academyd.habitat.base import HabitatError
    from academyd.settings import load_settings
    from academyd.worker.trust import worker_identity

    bound = load_settings(None, data_dir=tmp_path, nats={"url": "nats://x", "user": "worker-gpu1", "password": "p"})
    assert worker_identity(bound, None)[0] == "gpu1"
    assert worker_identity(bound, "gpu1")[1].inbox_prefix == "_INBOX_w_gpu1"
    with pytest.raises(HabitatError, match="its id is gpu1, not gpu2"):
        worker_identity(bound, "gpu2")
    nats_auth.add_worker(tmp_path / "nats", "gpu2")
    local = load_settings(None, data_dir=tmp_path, nats={"url": "nats://127.0.0.1:4222"})
    wid, cfg = worker_identity(local, "gpu2")
    assert (wid, cfg.user, cfg.password) == ("gpu2", "worker-gpu2", nats_auth.read_password(tmp_path / "nats",
                                                                                           "worker-gpu2"))
    shared = load_settings(None, data_dir=tmp_path, nats={"url": "nats://x", "user": "academy-worker", "password": "p"})
    with capture_logs() as logs:
        assert worker_identity(shared, "w7")[0] == "w7"
    assert [e["event"] for e in logs] == ["worker_identity_shared"]
