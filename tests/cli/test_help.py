"""`academyd --help` and every subcommand's help are complete: each command and option says what it does."""

from __future__ import annotations

import argparse

import pytest

from academyd.cli import build_parser, main

EXPECTED = {"run", "status", "train", "dataset", "outbox", "models", "import-venom", "bridge-venom", "schemas", "worker", "worker-identity", "follow"}


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.extend(walk(sub, (*path, name)))
    return out


def test_every_command_is_there_and_documented() -> None:
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(top.choices) == EXPECTED
    helps = {c.dest: c.help for c in top._choices_actions}
    for name in EXPECTED:
        assert helps.get(name), f"`academyd {name}` has no one-line help in `academyd --help`"
    undocumented = []
    for path, sub in walk(parser):
        if path and not (sub.description or helps.get(path[0])):
            undocumented.append(" ".join(path))
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                undocumented.append(f"{' '.join(path)} {action.option_strings or action.dest}")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        undocumented.append(f"{' '.join(path)} {choice.dest} (no one-line help)")
    assert undocumented == []


@pytest.mark.parametrize("argv", [
    [], ["run"], ["status"], ["train"], ["dataset"], ["dataset", "build"], ["dataset", "backfill-git"],
    ["models"], ["models", "list"], ["models", "show"], ["models", "promote"], ["models", "rollback"],
    ["import-venom"], ["schemas"], ["schemas", "export"], ["worker"], ["follow"],
])
def test_help_prints_and_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: academyd")
    if argv and argv[-1] not in ("dataset", "models", "schemas"):
        assert "--json" in out or argv in (["run"], ["worker"], ["follow"]), f"academyd {' '.join(argv)} has no --json"
    if argv in (["status"], ["train"], ["models", "promote"], ["worker"]):
        assert "--nats-url" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("academyd ")
