"""`academyd models`: list and show read the database; promote and rollback need the daemon.

Synchronous on purpose: the CLI runs its own event loop (asyncio.run), as it does in a shell. The
promote/rollback path through a running daemon is the daemon engineer's end-to-end test."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

from academyd.champion.moves import promote
from academyd.cli import main
from academyd.registry import Registry
from academyd.settings import Settings
from academyd.store import Store

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_models_cli(arena_settings: Settings, arena_store: Store, trained_good: Path, trained_noise: Path,
                          tiny_base_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = arena_settings
    s.arena.gguf = False
    data = ["--data-dir", str(s.data_dir)]
    assert main(["models", "list", *data]) == 0
    assert "no model versions yet" in capsys.readouterr().out

    reg = Registry(arena_store, s)
    for run_id, run in (("run-1", trained_good), ("run-2", trained_noise)):
        reg.add_candidate(run_id=run_id, adapter_src=run / "adapter", dataset=None, base_model=str(tiny_base_model),
                          run_summary=json.loads((run / "summary.json").read_text()), now=NOW)
        if run_id == "run-1":
            asyncio.run(promote(arena_store, s, "v1", reason="first", now=NOW))

    assert main(["models", "list", *data]) == 0
    tree = capsys.readouterr().out
    assert "v1" in tree and "champion" in tree and "v2" in tree and "candidate" in tree
    # v2 is drawn under v1 (its parent): deeper indentation.
    drawn = [line for line in tree.splitlines() if "── " in line]  # the tree, not log lines
    line_v1 = next(line for line in drawn if "v1 " in line)
    line_v2 = next(line for line in drawn if "v2 " in line)
    assert line_v2.index("v2") > line_v1.index("v1")

    assert main(["models", "list", "--json", *data]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["parent"], v["status"]) for v in listed] == [("v1", None, "champion"),
                                                                        ("v2", "v1", "candidate")]
    assert main(["models", "show", "champion", "--json", *data]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v1" and [h["action"] for h in shown["history"]] == ["registered", "promoted"]
    assert main(["models", "show", "v2", *data]) == 0
    assert "adapter_sha256" in capsys.readouterr().out

    assert main(["models", "show", "v9", *data]) == 2
    assert "no version v9" in capsys.readouterr().err
    assert main(["models", "promote", "latest", *data]) == 2
    assert "not a version name" in capsys.readouterr().err
    nats = ["--nats-url", f"nats://127.0.0.1:{free_port()}"]
    assert main(["models", "promote", "v2", *data, *nats]) == 3
    assert "academyd run" in capsys.readouterr().err
    assert main(["models", "rollback", *data, *nats]) == 3


def test_models_cli_without_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list", "--data-dir", str(tmp_path)]) == 2
    assert "start the daemon once" in capsys.readouterr().err
