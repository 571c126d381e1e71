"""The default recipe across trainer seeds: does it teach, and does it keep the base's general skill?

    .venv/bin/python bench/bench_recipe.py [--seeds 1 2 3] [--json OUT]

Runs the real loop (tests/model/test_real_loop.py: 120 Venom-style lessons -> daemon -> LoRA on the CPU with
the default recipe -> arena in llama.cpp -> model.promoted -> follower swap) once per trainer seed, each in
its own pytest process (ACADEMY_REAL_LOOP_SEED), and reads the figures that run writes
(ACADEMY_REAL_LOOP_FIGURES). A seed whose candidate the gate refused is a result, not an error: it is
reported with the gate's reasons. About 6 minutes per seed on 2 cores.

Printed per seed and as mean / min / max: held-out phrasings answered (new vs base, through the endpoint),
general-set loss change vs the base (the arena's forgetting rule, transformers and served in llama.cpp),
general answers chrF (new vs base), the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, work: Path) -> dict[str, Any]:
    out = work / f"seed-{seed}.json"
    env = {**os.environ, "ACADEMY_REAL_LOOP_SEED": str(seed), "ACADEMY_REAL_LOOP_FIGURES": str(out),
           "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/model/test_real_loop.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    seconds = time.monotonic() - t0
    if not out.exists():
        raise SystemExit(f"seed {seed}: the real loop wrote no figures (rc {proc.returncode}):\n"
                         + proc.stdout[-4000:] + proc.stderr[-2000:])
    fig = json.loads(out.read_text())
    fig["test_passed"] = proc.returncode == 0
    fig["wall_s"] = round(seconds, 1)
    if proc.returncode != 0 and fig.get("verdict") == "promote":
        fig["failure"] = proc.stdout[-1500:]
    return fig


def row(fig: dict[str, Any]) -> dict[str, Any]:
    m = fig.get("metrics") or {}
    forget = m.get("forgetting") or {}
    served = (m.get("served") or {}).get("forgetting") or {}
    acc = fig.get("heldout_accuracy") or {}
    chrf = fig.get("general_chrf") or {}
    return {
        "seed": fig["seed"], "verdict": fig.get("verdict"), "test_passed": fig.get("test_passed"),
        "heldout_new": acc.get("new"), "heldout_base": acc.get("base"),
        "heldout_diff_ci95": acc.get("difference_ci95"),
        "general_loss_change": forget.get("relative_change"),
        "served_general_loss_change": served.get("relative_change"),
        "general_chrf_new": chrf.get("new"), "general_chrf_base": chrf.get("base"),
        "refused_because": [r for r in fig.get("reasons", []) if "forget" in r or "worse" in r]
        if fig.get("verdict") != "promote" else [],
        "wall_s": fig.get("wall_s"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as tmp:
        rows = []
        for seed in args.seeds:
            r = row(run_seed(seed, Path(tmp)))
            rows.append(r)
            print(json.dumps(r), flush=True)

    def spread(key: str) -> dict[str, float] | None:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if not vals:
            return None
        return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals), "n": len(vals)}

    summary = {"seeds": args.seeds, "promoted": sum(r["verdict"] == "promote" for r in rows),
               **{k: spread(k) for k in ("heldout_new", "heldout_base", "general_loss_change",
                                         "served_general_loss_change", "general_chrf_new", "general_chrf_base")},
               "rows": rows}
    print("RECIPE " + json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
