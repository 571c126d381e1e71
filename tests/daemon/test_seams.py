"""The composition root is thin and the seams hold: no part below `App` knows it (no import of
academyd.app, no constructor parameter typed Any or App), no import cycle through the daemon's core
(lazy imports included), and the real parts satisfy the protocols they are wired through."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

from fixtures.source import parse_source

from academyd import seams
from academyd.champion import Champion
from academyd.dashboard import WebServer
from academyd.dashboard.metrics import AcademyCollector
from academyd.events import EventSink, Outbox
from academyd.intake import Intake
from academyd.pipeline import Pipeline
from academyd.status import StatusBuilder
from academyd.trigger import Trigger

ROOT = Path(__file__).resolve().parents[2]
# The parts App wires through the seams; a cycle through any of them (even a lazy import) fails.
CORE = {"academyd.app", "academyd.pipeline", "academyd.events", "academyd.seams", "academyd.status",
        "academyd.trigger", "academyd.endpoints", "academyd.intake", "academyd.clock", "academyd.store", "academyd.outbox",
        "academyd.dashboard", "academyd.dashboard.server", "academyd.dashboard.metrics", "academyd.dashboard.data",
        "academyd.champion", "academyd.champion.service", "academyd.champion.monitor", "academyd.champion.moves",
        "academyd.champion.artifacts", "academyd.champion.errors",
        "academyd.registry"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "academyd").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = p
    return out


def _imports(path: Path, mods: dict[str, Path], *, lazy: bool) -> set[str]:
    """academyd modules `path` imports (TYPE_CHECKING blocks aside; function bodies too when `lazy`)."""
    found: set[str] = set()

    def walk(nodes: list[ast.stmt]) -> None:
        for n in nodes:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                continue
            if isinstance(n, ast.Import):
                found.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                subs = [f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods]
                found.update(subs)
                if len(subs) < len(n.names):
                    found.add(n.module)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and not lazy:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                walk(getattr(n, field, None) or [])

    walk(parse_source(path).body)
    return {m for m in found if m in mods}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    mods = _modules()
    top = {m: _imports(p, mods, lazy=False) - {m} for m, p in mods.items()}
    assert _cycles(top) == [], "module-level import cycle"
    everything = {m: _imports(p, mods, lazy=True) - {m} for m, p in mods.items()}
    through_core = [c for c in _cycles(everything) if CORE & set(c)]
    assert through_core == [], "an import cycle through the core, hidden by a lazy import"


def test_nothing_below_the_root_imports_app() -> None:
    offenders = []
    for path in sorted((ROOT / "academyd").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("academyd/app.py", "academyd/commands/run.py"):  # the root, and the command that runs it
            continue
        for n in ast.walk(parse_source(path)):  # TYPE_CHECKING and function bodies included
            names = ([a.name for a in n.names] if isinstance(n, ast.Import)
                     else [n.module or ""] + [f"{n.module}.{a.name}" for a in n.names]
                     if isinstance(n, ast.ImportFrom) else [])
            if "academyd.app" in names:
                offenders.append(f"{rel}:{n.lineno}")
    assert offenders == []


def test_the_parts_take_their_seams_not_the_daemon() -> None:
    for part in (Pipeline, WebServer, AcademyCollector, Trigger, StatusBuilder, Outbox, Champion, Intake):
        for name, param in inspect.signature(part.__init__).parameters.items():
            annotation = str(param.annotation)
            assert name != "app" and "App" not in annotation and annotation != "Any", (part.__name__, name)


def test_the_real_parts_satisfy_their_protocols() -> None:
    assert issubclass(Trigger, seams.RunRequests)
    assert issubclass(StatusBuilder, seams.StatusSource) and issubclass(Pipeline, seams.StatusSource)
    assert issubclass(WebServer, seams.StatusSource)
    assert issubclass(Pipeline, seams.ModelActions)
    assert issubclass(Champion, seams.ChampionMoves)
    assert issubclass(Outbox, EventSink)
    from academyd.app import App

    assert issubclass(App, seams.LiveEvents)


def test_only_the_store_touches_sqlite() -> None:
    """SQL lives in academyd/store/ (one module per table group): no other module imports sqlite3 or
    reaches for a store's connection (`.conn`) or its raw-SQL helper (`.scalar`), in function bodies and
    TYPE_CHECKING blocks too."""
    store_dir = ROOT / "academyd" / "store"
    checked, offenders = 0, []
    for path in sorted((ROOT / "academyd").rglob("*.py")):
        if store_dir in path.parents:
            continue
        checked += 1
        rel = path.relative_to(ROOT).as_posix()
        for n in ast.walk(parse_source(path)):
            if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "sqlite3" for a in n.names):
                offenders.append(f"{rel}:{n.lineno}: import sqlite3")
            elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "sqlite3":
                offenders.append(f"{rel}:{n.lineno}: from sqlite3 import")
            elif isinstance(n, ast.Attribute) and n.attr in ("conn", "scalar"):
                offenders.append(f"{rel}:{n.lineno}: .{n.attr} ({ast.unparse(n)})")
    assert checked > 50  # the walk really covered the daemon
    assert offenders == [], "SQL outside academyd/store/: add a method to the table group's module instead"
