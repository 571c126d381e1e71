"""Shared test setup. Each area keeps its fixtures in tests/fixtures/<area>.py (registered here)."""

pytest_plugins = [
    "fixtures.nats",
    "fixtures.trainer",
    "fixtures.docker",
    "fixtures.curator",
    "fixtures.arena",
    "fixtures.web",
    "fixtures.systemd",
    "fixtures.scale",
    "fixtures.follower",
    "fixtures.venom",
    "fixtures.realmodel",
    "fixtures.gate_real",
]
