"""Shared test setup. Each area keeps its fixtures in tests/fixtures/<area>.py (registered here)."""

import pytest

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

# `make test` runs the suite on two xdist workers (-n 2 --dist loadgroup --no-loadscope-reorder): while one
# test waits on a broker, a daemon or a container, the other has the CPU. A group runs on one worker, one
# test after another, and is what the scheduler hands out:
# - a module is a group (its module-scoped fixtures are made once);
# - modules that share a costly session fixture are one group, so it is made once, not once per worker;
# - the groups that take longest go first (the scheduler hands them out in collection order), so the suite
#   does not end with one worker alone on the real loop.
SHARED_FIXTURES = ("gate_real", "follower_adapters", "trained_good", "trained_noise")
LONGEST_FIRST = ("tests/model/test_real_loop.py", "gate_real", "follower_adapters",
                 "tests/trainer/test_docker_habitat.py", "tests/trainer/test_validation.py")


def _module_groups(items: list[pytest.Item]) -> dict[str, str]:
    groups: dict[str, str] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        shared = next((f for f in SHARED_FIXTURES if f in getattr(item, "fixturenames", ())), None)
        if shared is not None and groups.get(module, module) == module:
            groups[module] = "trained_good" if shared == "trained_noise" else shared
        groups.setdefault(module, module)
    return groups


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = _module_groups(items)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(groups[item.nodeid.split("::", 1)[0]], i)

    def order(pair: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        group = groups[pair[1].nodeid.split("::", 1)[0]]
        return rank.get(group, len(rank)), first_seen[group], pair[0]

    items[:] = [item for _, item in sorted(enumerate(items), key=order)]
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid.split("::", 1)[0]]))
