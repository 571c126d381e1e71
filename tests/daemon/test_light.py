"""The daemon stays light: importing everything it runs never pulls torch (or transformers)."""

from __future__ import annotations

import subprocess
import sys


def test_daemon_never_imports_torch() -> None:
    code = (
        "import sys, academyd.cli, academyd.app, academyd.bus, academyd.store, handlers, schemas\n"
        "import pkgutil, importlib, academyd\n"
        "for m in pkgutil.walk_packages(academyd.__path__, 'academyd.'):\n"
        "    if m.name.startswith('academyd.trainer') and m.name != 'academyd.trainer.spec':\n"
        "        continue  # the trainer runs in its own interpreter\n"
        "    importlib.import_module(m.name)\n"
        "heavy = sorted(n for n in ('torch', 'transformers', 'peft', 'unsloth', 'trl') if n in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the daemon imported {out.stdout.strip()}"
