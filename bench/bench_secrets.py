"""Secret-scanner benchmark: recall and false positives per kind on tests/secrets/corpus.jsonl, and
throughput, for academyd.secrets against stock detect-secrets (all plugins, its own engine) in one run.

    .venv/bin/python bench/bench_secrets.py [--mb 40]

Recall: a secret counts as caught only if no 8 of its characters survive redaction (academyd) or if
detect-secrets reports a finding on a line that holds it (stock: it reports, it does not redact;
its public file scan, default plugins and filters, verification off; a private key counts as caught
only where its body lines are flagged, which stock never does: it flags the BEGIN line).
False positive: any finding in a hard negative. Throughput: lesson-like text (the curator bench's
generator, 1 line in 200 with an AWS key) in MB/s, and the ratio of the two scanners.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "secrets"))
sys.path.insert(0, str(ROOT / "bench"))

import make_corpus as mc  # noqa: E402
from curator_bench import Text  # noqa: E402

from academyd.secrets import scanner  # noqa: E402


def _stock_scan(text: str, tmp: Path) -> set[int]:
    """Line numbers (0-based) stock detect-secrets flags in `text`, through its public file scan (a
    .yaml file, so that its keyword plugin reads unquoted `key: value`), verification off."""
    from detect_secrets import SecretsCollection

    path = tmp / "sample.yaml"
    path.write_text(text, encoding="utf-8")
    found = SecretsCollection()
    found.scan_file(str(path))
    return {s.line_number - 1 for _, s in found}


def stock_per_kind(rows: list[dict]) -> dict[str, dict]:
    import tempfile

    from detect_secrets.settings import default_settings

    out: dict[str, dict] = {}
    with default_settings() as settings, tempfile.TemporaryDirectory() as tmp:
        settings.disable_filters("detect_secrets.filters.common.is_ignored_due_to_verification_policies")
        for row in rows:
            k = out.setdefault(row["kind"], {"label": row["label"], "n": 0, "bad": 0, "examples": []})
            k["n"] += 1
            lines = row["text"].split("\n")
            flagged = _stock_scan(row["text"], Path(tmp))
            if row["label"] == "secret":
                caught = all(any(i < len(lines) and s[:8] in lines[i] for i in flagged) for s in row["secrets"])
                k["bad"] += not caught
            else:
                k["bad"] += bool(flagged)
    return out


def texts(mb: float, seed: int = 1) -> list[str]:
    t, r = Text(seed), random.Random(seed)
    out, size = [], 0
    while size < mb * 1e6:
        s = t.sentence(r.randint(15, 45))
        if r.random() < 0.005:
            s += " export AWS_ACCESS_KEY_ID=AKIA" + "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
        out.append(s)
        size += len(s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=40.0, help="MB of lesson-like text for the throughput run")
    args = ap.parse_args()
    rows = mc.load()
    t0 = time.perf_counter()
    s = scanner()
    build_s = time.perf_counter() - t0
    ours = mc.score(s, rows)
    stock = stock_per_kind(rows)
    print(f"{'kind':30} {'n':>4} {'academyd':>9} {'stock':>9}")
    for label, what in (("secret", "recall"), ("negative", "fp")):
        print(f"-- {what} per kind")
        for kind in sorted(k for k, v in ours.items() if v["label"] == label):
            o, d = ours[kind], stock[kind]
            rate = (lambda v: 1 - v["bad"] / v["n"]) if label == "secret" else (lambda v: v["bad"] / v["n"])
            print(f"{kind:30} {o['n']:4} {rate(o):9.3f} {rate(d):9.3f}")
    r_ours, fp_ours = mc.totals(ours)
    r_stock, fp_stock = mc.totals(stock)
    print(f"overall recall: academyd {r_ours:.4f}  stock detect-secrets {r_stock:.4f}   (target >= 0.99)")
    print(f"overall false positives: academyd {fp_ours:.4f}  stock detect-secrets {fp_stock:.4f}   (target <= 0.02)")

    data = texts(args.mb)
    mb = sum(map(len, data)) / 1e6
    stats: Counter[str] = Counter()
    t0 = time.perf_counter()
    for lo in range(0, len(data), 512):
        s.clean_many(data[lo: lo + 512], stats)
    ours_s = time.perf_counter() - t0
    import tempfile

    from detect_secrets.settings import default_settings

    sample = data[: max(1, len(data) // 100)]  # stock is slow: time a 1 % sample and scale
    with default_settings() as settings, tempfile.TemporaryDirectory() as tmp:
        settings.disable_filters("detect_secrets.filters.common.is_ignored_due_to_verification_policies")
        t0 = time.perf_counter()
        _stock_scan("\n".join(sample), Path(tmp))
        stock_s = (time.perf_counter() - t0) * len(data) / len(sample)
    print(f"scanner built in {build_s:.2f} s (once per process)")
    print(f"throughput on {mb:.1f} MB of lesson text: academyd {mb / ours_s:.1f} MB/s ({ours_s:.2f} s, "
          f"{stats['lines_checked']} lines past the prefilter); stock detect-secrets {mb / stock_s:.2f} MB/s "
          f"(est. {stock_s:.0f} s); ratio {stock_s / ours_s:.0f}x")
    return 0 if r_ours >= 0.99 and fp_ours <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
