"""The inbound consumer's leader SIGKILLed under ingest on a real 3-node cluster: while a new leader is
elected, pull requests are answered 503 / no responders; the daemon backs off (academyd.bus.Puller)
instead of asking again at once, and says so once per outage, not per request."""

from __future__ import annotations

from collections import Counter

import nats
from structlog.testing import capture_logs

from fixtures.nats import db_count, wait_for
from test_cluster import cluster_settings, publish_all

LESSONS = 3000


async def test_a_consumer_leader_election_costs_a_few_warnings_not_thousands(
    nats_cluster, start_daemon, tmp_path
) -> None:
    settings = cluster_settings(nats_cluster, tmp_path / "data")
    with capture_logs() as logs:
        d = await start_daemon(settings)
        nc = await nats.connect(servers=nats_cluster.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        try:
            js = nc.jetstream(timeout=5)
            info = await js.consumer_info(settings.nats.inbound_stream, settings.nats.consumer)
            leader = next(n for n in nats_cluster.nodes if n.name == info.cluster.leader)
            before = len(logs)
            await publish_all(js, LESSONS, leader.kill)
            assert not leader.alive
            await wait_for(lambda: db_count(settings.db_path, "SELECT COUNT(*) FROM lessons") >= LESSONS,
                           timeout=120, interval=0.5)
            during = logs[before:]
            new_leader = (await js.consumer_info(settings.nats.inbound_stream, settings.nats.consumer)).cluster.leader
        finally:
            await nc.close()
    warnings = [e for e in during if e.get("log_level") in ("warning", "error")]
    print(f"{len(warnings)} warning lines across the election ({info.cluster.leader} -> {new_leader}):",
          Counter(e["event"] for e in warnings).most_common(8))
    assert new_leader != info.cluster.leader
    assert db_count(settings.db_path, "SELECT COUNT(DISTINCT lesson_id) FROM lessons") == LESSONS
    assert len(warnings) < 100, Counter(e["event"] for e in warnings).most_common(8)


def test_the_pull_backoff_doubles_from_50_ms_to_a_2_s_cap() -> None:
    from academyd.bus import Puller, backoff_delay

    got = [backoff_delay(n, Puller.BACKOFF_FIRST_S, Puller.BACKOFF_MAX_S) for n in (0, 1, 2, 3, 6, 7, 10, 10_000)]
    assert got == [0.05, 0.05, 0.1, 0.2, 1.6, 2.0, 2.0, 2.0]
