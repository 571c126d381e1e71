"""Shared test setup. Each area keeps its fixtures in tests/fixtures/<area>.py (registered here)."""

from typing import Any

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

# `make test` runs the suite on two xdist workers (-n 2 --no-loadscope-reorder). The unit the scheduler hands
# a worker is a group of tests that run one after another there (`Groups` below, through xdist's
# pytest_xdist_make_scheduler hook: its own loadgroup mode does not work with pytest 9, whose nodes keep
# their id in `_id`, not the `_nodeid` it rewrites: pytest-dev/pytest-xdist#1386, open):
# - a module is a group (its module-scoped fixtures are made once);
# - modules that share a costly session fixture are one group (SHARED), so it is made once, not once per
#   worker; a module that uses one and is not listed stops the collection (`_check_shared`);
# - the groups that take longest go first (LONGEST_FIRST; the scheduler hands groups out in collection
#   order), so the suite does not end with one worker alone on the real loop.
SHARED: dict[str, tuple[str, ...]] = {  # session fixture -> the modules that use it
    "gate_real": ("tests/arena/test_gate_real.py", "tests/scale/test_eval_jobs.py"),
    "follower_adapters": ("tests/arena/test_served.py", "tests/follower/test_llamacpp_swap.py",
                          "tests/follower/test_ollama_merged.py"),
    "trained_good": ("tests/arena/test_arena.py", "tests/arena/test_cli.py", "tests/arena/test_identity.py",
                     "tests/arena/test_promotion.py", "tests/arena/test_registry.py",
                     "tests/pipeline/test_champion.py"),
}
SHARED_ALIASES = {"trained_noise": "trained_good"}  # made in the same group as trained_good
GROUP_OF = {module: fixture for fixture, modules in SHARED.items() for module in modules}
LONGEST_FIRST = ("tests/model/test_real_loop.py", "gate_real", "follower_adapters",
                 "tests/trainer/test_docker_habitat.py", "tests/trainer/test_validation.py")


def group_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return GROUP_OF.get(module, module)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return Groups(config, log)


def _check_shared(items: list[pytest.Item]) -> None:
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            fixture = SHARED_ALIASES.get(name, name)
            module = item.nodeid.split("::", 1)[0]
            if fixture in SHARED and GROUP_OF.get(module) != fixture:
                raise pytest.UsageError(f"{module} uses the session fixture {name}: add it to SHARED[{fixture!r}] "
                                        "in tests/conftest.py, so the fixture is made once")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _check_shared(items)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(group_of(item.nodeid), i)

    def order(pair: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        group = group_of(pair[1].nodeid)
        return rank.get(group, len(rank)), first_seen[group], pair[0]

    items[:] = [item for _, item in sorted(enumerate(items), key=order)]
