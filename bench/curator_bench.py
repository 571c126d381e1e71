"""Curator benchmark: 100,000 lessons + 10,000 commits + 10,000 tasks end to end, then 200,000 lessons.

    .venv/bin/python bench/curator_bench.py [--lessons 100000] [--commits 10000] [--tasks 10000]

Setup (not timed): a real SQLite store filled in bulk, a real git repository made with `git fast-import`.
Timed: `build_dataset` from the store to the written files. Prints per-stage seconds, the total, the
target (< 15 s on 2 cores) and the ratio of the 2x-lessons run to the 1x run (target <= 2.1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from academyd.curator import build_dataset  # noqa: E402
from academyd.settings import load_settings  # noqa: E402
from academyd.store import Store  # noqa: E402

NOW = datetime(2026, 2, 1, tzinfo=UTC)
COMMON = ("the a to of and in for with on agent task model lesson error retry timeout cache query user file "
          "config server request response memory planner tool result test build deploy fix update add "
          "remove check value list index path data queue worker network api client session key token").split()


class Text:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        letters = "abcdefghijklmnoprstuwyz"
        self.vocab = ["".join(self.rng.choice(letters) for _ in range(self.rng.randint(3, 9))) for _ in range(20000)]

    def sentence(self, n: int) -> str:
        r = self.rng
        return " ".join(r.choice(COMMON) if r.random() < 0.35 else r.choice(self.vocab) for _ in range(n)) + "."


def fill_store(store: Store, lessons: int, tasks: int, shas: list[str], seed: int) -> None:
    t = Text(seed)
    r = random.Random(seed)
    at = NOW.isoformat()
    inbox, lrows, trows, crows = [], [], [], []
    for i in range(lessons):
        eid = f"l{i}"
        ok = r.random() < 0.8
        situation, action = t.sentence(r.randint(15, 40)), t.sentence(r.randint(15, 45))
        if i % 200 == 0:
            action += f" export AWS_ACCESS_KEY_ID=AKIA{''.join(r.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ234567') for _ in range(16))}"
        if i % 97 == 0 and i:
            situation, action = lrows[-1][4], lrows[-1][5]  # an exact duplicate now and then
        result = ("Sukces ✅ " if ok else "Błąd: ") + t.sentence(6)
        inbox.append((eid, "lesson.created", None, at))
        lrows.append((eid, f"L{i}", at, situation, action, result, t.sentence(10), "[]", "{}", int(ok), at))
    for i in range(tasks):
        eid = f"t{i}"
        inbox.append((eid, "task.completed", None, at))
        status = "COMPLETED" if r.random() < 0.85 else "FAILED"
        trows.append((eid, f"T{i}", t.sentence(r.randint(15, 40)), t.sentence(r.randint(30, 90)), status, "[]", None,
                      None, int(status == "COMPLETED"), at))
    for i, sha in enumerate(shas):
        eid = f"c{i}"
        inbox.append((eid, "commit.pushed", None, at))
        crows.append((eid, "bench", sha, "main", None, None, None, at))
    with store.transaction():
        store.conn.executemany("INSERT INTO inbox VALUES (?,?,?,?)", inbox)
        store.conn.executemany(
            "INSERT INTO lessons(event_id, lesson_id, timestamp, situation, action, result, feedback, tags, metadata,"
            " success, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", lrows)
        store.conn.executemany(
            "INSERT INTO tasks(event_id, task_id, content, result, status, logs, context_history, model_version,"
            " success, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)", trows)
        store.conn.executemany(
            "INSERT INTO commits(event_id, repo, sha, branch, message, author, pushed_at, received_at)"
            " VALUES (?,?,?,?,?,?,?,?)", crows)


def make_repo(path: Path, commits: int, seed: int) -> list[str]:
    """A linear history of `commits` commits, each editing one of 200 files, via one fast-import stream."""
    t = Text(seed + 1)
    r = random.Random(seed)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    files: dict[str, list[str]] = {}
    out = []
    for i in range(commits):
        name = f"src/mod{r.randrange(200)}.py"
        lines = files.setdefault(name, [t.sentence(8) for _ in range(20)])
        for _ in range(r.randint(1, 12)):
            lines[r.randrange(len(lines))] = t.sentence(r.randint(4, 12))
        if r.random() < 0.05:
            lines.extend(t.sentence(10) for _ in range(60))  # an occasional big change (truncated or dropped)
        data = "\n".join(lines).encode() + b"\n"
        msg = f"{r.choice(['Add', 'Fix', 'Teach', 'Refactor', 'Document'])} {t.sentence(r.randint(4, 10))}".encode()
        out.append(b"commit refs/heads/main\nmark :%d\ncommitter Bench <b@example.com> %d +0000\n"
                   b"data %d\n%s\n" % (i + 1, 1_700_000_000 + i, len(msg), msg))
        if i:
            out.append(b"from :%d\n" % i)
        out.append(b"M 100644 inline %s\ndata %d\n%s\n" % (name.encode(), len(data), data))
    subprocess.run(["git", "-C", str(path), "fast-import", "--quiet"], input=b"".join(out), check=True)
    log = subprocess.run(["git", "-C", str(path), "log", "--format=%H", "main"], check=True, capture_output=True, text=True)
    return log.stdout.split()


def run(lessons: int, tasks: int, commits: int, root: Path) -> dict:
    repo = root / "repo"
    if not repo.exists():
        make_repo(repo, commits, 1)
    shas = subprocess.run(["git", "-C", str(repo), "log", "--format=%H", "main"], check=True, capture_output=True,
                          text=True).stdout.split()[:commits]
    data = root / f"data-{lessons}"
    settings = load_settings(None, data_dir=data, repos={"bench": repo})
    store = Store.open(settings.db_path)
    fill_store(store, lessons, tasks, shas, 7)
    t0, c0 = time.perf_counter(), time.process_time()
    result = build_dataset(settings, store, now=NOW)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    store.close()
    return {"lessons": lessons, "total_s": round(total, 2), "cpu_s": round(cpu, 2), "stages_s": result.timings, "examples": result.examples,
            "heldout": result.heldout, "dropped": result.dropped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lessons", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = run(args.lessons, args.tasks, args.commits, root)
        two = run(args.lessons * 2, args.tasks, args.commits, root)
    ratio = two["total_s"] / one["total_s"]
    if args.json:
        print(json.dumps({"1x": one, "2x": two, "ratio": ratio}, indent=1))
    print(f"machine: {os.cpu_count()} cores")
    for label, r in (("1x", one), ("2x", two)):
        stages = "  ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
        print(f"{label}: {r['lessons']:,} lessons + {args.commits:,} commits + {args.tasks:,} tasks: "
              f"{r['total_s']:.2f} s, CPU {r['cpu_s']:.2f} s ({r['examples']:,} train, {r['heldout']:,} held-out)"
              f"\n    stages (s): {stages}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (wall times include waiting for the CPU)")
    print(f"1x under 15 s: {one['total_s'] < 15}   2x/1x = {ratio:.2f} (target <= 2.1): {ratio <= 2.1}")
    per = {k: round(two["stages_s"].get(k, 0) / v, 2) for k, v in one["stages_s"].items() if v > 0.05}
    print(f"per-stage 2x/1x: {per}")
    return 0 if one["total_s"] < 15 and ratio <= 2.1 else 1


if __name__ == "__main__":
    sys.exit(main())
