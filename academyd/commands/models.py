"""`academyd models`: the registry's versions, their genealogy, promotion and rollback.

- `models list` and `models show V` read the registry straight from the SQLite database, read-only (no
  daemon needed; WAL lets them read while the daemon writes).
- `models promote V` and `models rollback` go through the running daemon (`academy.cmd.promote`,
  `academy.cmd.rollback`), so there is one path that changes the champion and publishes the events.

Exit codes: 0 ok, 1 refused or failed, 2 bad input (unknown version, bad name, no registry), 3 no daemon.
"""

from __future__ import annotations

import argparse
from typing import Any

from academyd.commands.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    add_json_arg,
    add_settings_args,
    fail,
    guard,
    print_json,
    request,
    settings_from,
)
from academyd.registry import RegistryError, connect_readonly
from schemas.models import is_version

STYLE = {"champion": "bold green", "candidate": "cyan", "retired": "dim", "rejected": "red"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="model versions: list, show, promote, rollback",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    lp = msub.add_parser("list", help="every version as a genealogy tree (reads the database)")
    add_settings_args(lp)
    add_json_arg(lp)
    lp.set_defaults(func=guard(_list))

    sp = msub.add_parser("show", help="one version, whole (reads the database)")
    sp.add_argument("version", help="e.g. v3, or 'champion'")
    add_settings_args(sp)
    add_json_arg(sp)
    sp.set_defaults(func=guard(_show))

    pp = msub.add_parser("promote", help="make a version the champion (through the daemon)",
                         description="Send academy.cmd.promote. The daemon checks the version's files and "
                         "checksum, writes the Modelfile, GGUF and active_adapter.json, creates the Ollama "
                         "model when configured, and publishes model.promoted.")
    pp.add_argument("version", help="e.g. v3")
    pp.add_argument("--reason", default="manual", help="why (kept in the history and the event)")
    add_settings_args(pp)
    add_json_arg(pp)
    pp.set_defaults(func=guard(_promote))

    rp = msub.add_parser("rollback", help="bring the champion's parent back (through the daemon)",
                         description="Send academy.cmd.rollback: the champion's parent becomes champion again "
                         "(the base model when there is none); model.rolled_back and model.promoted are published.")
    rp.add_argument("--reason", default="manual", help="why (kept in the history and the event)")
    add_settings_args(rp)
    add_json_arg(rp)
    rp.set_defaults(func=guard(_rollback))


def _open(args: argparse.Namespace) -> Any:
    settings = settings_from(args)
    return connect_readonly(settings.db_path)


def _metric(v: dict[str, Any]) -> str:
    held = (v.get("metrics") or {}).get("heldout") or {}
    if held.get("candidate_loss") is None:
        return ""
    text = f"loss {held['candidate_loss']:.3f}"
    if held.get("ci_low") is not None:
        text += f", Δ {held.get('improvement', 0):+.3f} [{held['ci_low']:+.3f}, {held['ci_high']:+.3f}]"
    return text


def _list(args: argparse.Namespace) -> int:
    try:
        store = _open(args)
    except RegistryError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        versions = store.list_versions()
    finally:
        store.close()
    if args.json:
        print_json(versions)
        return 0
    from rich.console import Console
    from rich.tree import Tree

    console = Console()
    if not versions:
        console.print("no model versions yet: Venom runs the base model")
        return 0
    children: dict[str | None, list[dict[str, Any]]] = {}
    for v in versions:
        children.setdefault(v["parent"], []).append(v)
    bases = sorted({v["base_model"] for v in versions})
    root = Tree(f"[bold]base[/] {', '.join(bases)}" + ("" if any(v["is_champion"] for v in versions)
                                                         else "  [bold green]★ active[/]"))

    def add(node: Tree, parent: str | None) -> None:
        for v in children.get(parent, []):
            star = " [bold green]★ champion[/]" if v["is_champion"] else ""
            label = (f"[{STYLE.get(v['status'], '')}]{v['version']}[/] {v['status']}{star}  "
                     f"[dim]{v['created_at'][:19]} {v.get('dataset_id') or ''}[/] {_metric(v)}")
            add(node.add(label), v["version"])

    add(root, None)
    console.print(root)
    return 0


def _show(args: argparse.Namespace) -> int:
    try:
        store = _open(args)
    except RegistryError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        version = args.version
        if version == "champion":
            champion = store.champion_version()
            if champion is None:
                return fail("there is no champion: Venom runs the base model", EXIT_FAILED)
            version = champion
        if not is_version(version):
            return fail(f"{version!r} is not a version name; use v1, v2, ... or 'champion'", EXIT_USAGE)
        v = store.get_version(version)
    finally:
        store.close()
    if v is None:
        return fail(f"no version {version} in the registry; see `academyd models list`", EXIT_USAGE)
    v["production"] = _production(args, version)
    if args.json:
        print_json(v)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{v['version']}" + (" ★ champion" if v["is_champion"] else ""), show_header=False)
    for key in ("status", "parent", "base_model", "run_id", "dataset_id", "dataset_hash", "dataset_format",
                "spec_hash", "backend", "adapter_path", "adapter_sha256", "created_at", "evaluated_at",
                "promoted_at"):
        table.add_row(key, str(v.get(key) if v.get(key) is not None else "-"))
    table.add_row("packages", ", ".join(f"{k} {val}" for k, val in (v.get("packages") or {}).items()) or "-")
    verdict = v.get("verdict") or {}
    if verdict:
        table.add_row("verdict", f"{verdict.get('verdict')} (against {verdict.get('champion') or 'base'})")
        for reason in verdict.get("reasons") or []:
            table.add_row("", reason)
    for h in v.get("history") or []:
        table.add_row("history", f"{h['at'][:19]} {h['action']}: {h['reason']}")
    for p in v["production"]:
        table.add_row("in production", _production_line(p))
    Console().print(table)
    return 0


def _production(args: argparse.Namespace, version: str) -> list[dict[str, Any]]:
    """The watch of each promotion of `version` (#20): its running rate and band against its parent."""
    from academyd.dashboard import watch

    settings = settings_from(args)
    try:
        return [{k: val for k, val in p.items() if k != "series"}
                for p in watch.read(settings.db_path, settings, limit=1000) if p["version"] == version]
    except FileNotFoundError:
        return []


def _production_line(p: dict[str, Any]) -> str:
    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * x:.1f} %"

    state = f"watching ({p.get('tasks') or 0} tasks)" if p["state"] == "watching" else (
        f"{p['state']} ({p['cause']}) at task {p['at_task']}, {str(p.get('decided_at') or '')[:19]}")
    return (f"promoted {str(p.get('promoted_at') or '')[:19]}: {state}; success {pct(p.get('rate'))} over "
            f"{p.get('tasks') or 0} tasks, band {pct(p.get('cs_lower'))}-{pct(p.get('cs_upper'))}; {p['parent']} "
            f"{pct(p.get('parent_rate'))} over {p.get('parent_tasks') or 0} (rolled back below "
            f"{pct(p.get('rollback_below'))}, confirmed above {pct(p.get('confirm_above'))})")


def _reply(args: argparse.Namespace, reply: dict[str, Any], ok_text: str) -> int:
    ok = bool(reply.get("ok", "error" not in reply))
    if args.json:
        print_json(reply)
    elif ok:
        print(ok_text)
    else:
        print(f"refused: {reply.get('error') or reply.get('reason') or reply}")
    return 0 if ok else EXIT_FAILED


def _promote(args: argparse.Namespace) -> int:
    if not is_version(args.version):
        return fail(f"{args.version!r} is not a version name; use v1, v2, ... (see `academyd models list`)",
                    EXIT_USAGE)
    settings = settings_from(args)
    reply = request(settings, "academy.cmd.promote", {"version": args.version, "reason": args.reason}, timeout=900)
    return _reply(args, reply, f"promoted {args.version}")


def _rollback(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    reply = request(settings, "academy.cmd.rollback", {"reason": args.reason}, timeout=900)
    to = reply.get("to_version") or ((reply.get("rolled_back") or {}).get("to_version"))
    return _reply(args, reply, f"rolled back to {to or 'the base model'}")
