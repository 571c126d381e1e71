"""Trainer throughput: Unsloth backend vs the transformers+peft fallback, same model, data and spec.

    .venv/bin/python bench/bench_trainer.py [--repeat 2] [--steps 16] [--threads 2] [--json OUT]
    .venv/bin/python bench/bench_trainer.py --tiny     # the tiny random-init Llama of the tests instead
    .venv/bin/python bench/bench_trainer.py --gpu      # a ~1B-parameter random-init Llama on CUDA

The default CPU model is the real one: SmolLM2-135M-Instruct, the bundled GGUF (dequantized once into the
bench's own cache, so the first run pays it and it is not counted: tokens/s covers training only), with
the examples rendered through its chat template, r 16 on the seven usual targets, batch 4 x up to 128
tokens, 2 torch threads.

Each backend runs as a real trainer process (`python -m academyd.trainer`) in .venv-trainer; the numbers
come from the trainer's own summary.json: tokens/s of training (non-pad tokens fed / training time), peak
resident memory, peak GPU memory, final and held-out losses. Runs alternate backends (u, p, u, p, ...) so
load from other work on the machine hits both alike; the median of the repeats is reported, with the
ratio unsloth / peft. The device is the one the trainer reports, so a --gpu run that found no GPU says
so and stops instead of printing CPU numbers as GPU ones.

The tiny model's CPU runs use one torch thread: on a shared 2-core machine two threads fighting other work
for a core run ~10x slower and the comparison becomes noise.

    .venv/bin/python bench/bench_trainer.py --busy [--tiny] [--repeat 2]

The machine shared (issue 21): the same job (backend=auto, threads chosen by the trainer from the CPUs
free, academyd.trainer.cpu) with every core idle, with one core held busy by a spinning process, and busy
again with the trainer not nice'd; runs alternate; prints training time busy / idle (target <= 2.5x) and
the threads the trainer chose.

    .venv/bin/python bench/bench_trainer.py --save-calibration

also writes the tokens/s of both backends, keyed by this machine, where the trainer's `backend=auto` reads
them on the CPU (academyd.trainer.backend.calibration_path): auto then trains with the faster one here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "yellow", "black", "white", "cat", "dog", "bird", "fish", "horse", "cow", "apple", "pear", "plum", "grape", "lemon", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# ~1B parameters: 20 layers x (4 x 2048^2 attention + 3 x 2048 x 5632 MLP) = 1.03e9.
GPU_MODEL = ["--hidden", "2048", "--layers", "20", "--heads", "16", "--intermediate", "5632", "--vocab-size", "4096"]


def trainer_python() -> Path:
    py = REPO / ".venv-trainer" / "bin" / "python"
    if not py.is_file():
        sys.exit(f"{py} is missing: run `make trainer-env` first")
    return py


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO)}
    e.pop("VIRTUAL_ENV", None)
    return e


def build_model(out: Path, extra: list[str]) -> dict[str, Any]:
    proc = subprocess.run([str(trainer_python()), "-m", "fixtures.tiny", str(out), *extra],
                          env={**env(), "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"building the model failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def write_data(directory: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    """Reverse 3 to 12 words: learnable, and long enough for throughput to mean something."""
    rng = random.Random(0)
    paths = []
    for name, n in (("train", n_train), ("heldout", n_heldout)):
        lines = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            lines.append(json.dumps({"instruction": "Reverse the words.", "input": " ".join(words),
                                     "output": " ".join(reversed(words))}))
        path = directory / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def run_backend(work: Path, tag: str, spec: dict[str, Any], extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    out = work / tag
    spec = {**spec, "output_dir": str(out)}
    spec_path = work / f"{tag}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([str(trainer_python()), "-m", "academyd.trainer", str(spec_path)], env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, check=False)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    if proc.returncode != 0:
        sys.exit(f"{tag} failed ({proc.returncode}): {events[-1] if events else ''}\n{proc.stderr[-3000:]}")
    start = next(e for e in events if e["type"] == "start")
    summary = json.loads((out / "summary.json").read_text())
    return {"device": start["device"], **{k: summary[k] for k in (
        "backend", "tokens_per_s", "train_tokens", "train_duration_s", "peak_rss_mb", "peak_gpu_mb",
        "final_loss", "base_heldout_loss", "adapter_heldout_loss", "steps")}}


HOG = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


def run_busy(work: Path, tag: str, spec: dict[str, Any], busy: bool, nice: bool = True) -> dict[str, Any]:
    """One run of `spec`; with `busy`, a process spins one core for as long as the run lasts; without
    `nice`, the trainer keeps the daemon's priority (ACADEMY_TRAINER_NICE=0), to show what nice costs."""
    hog = subprocess.Popen([sys.executable, "-c", HOG.format(seconds=3600)]) if busy else None
    try:
        if hog is not None:
            import time

            time.sleep(1.0)  # at full speed before the trainer measures the CPUs
        out = work / tag
        r = run_backend(work, tag, spec, None if nice else {"ACADEMY_TRAINER_NICE": "0"})
        start = next(json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()
                     if json.loads(line)["type"] == "start")
        return {**r, "cpu": start["cpu"]}
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def busy_mode(work: Path, spec: dict[str, Any], repeat: int, model: dict[str, Any], out_json: Path | None) -> None:
    spec = {**spec, "cpu_threads": None, "backend": "auto"}
    runs: dict[str, list[dict[str, Any]]] = {"idle": [], "busy": [], "busy-nice0": []}
    for i in range(repeat):
        for arm in runs:
            load0 = os.getloadavg()[0]
            r = run_busy(work, f"{arm}-{i}", spec, arm != "idle", nice=arm != "busy-nice0")
            r["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after (others' work too)
            runs[arm].append(r)
            print(f"  run {i + 1}/{repeat} {arm:5s} {r['train_duration_s']:7.1f} s  {r['tokens_per_s']:7.0f} tok/s  "
                  f"threads {r['cpu']['threads']} (busy {r['cpu']['busy']:.2f}, wait {r['cpu']['omp_wait_policy']}, "
                  f"nice {r['cpu']['nice']})  backend {r['backend']}  load {r['loadavg_1m']}", file=sys.stderr,
                  flush=True)
    med = {arm: statistics.median(r["train_duration_s"] for r in rs) for arm, rs in runs.items()}
    ratio = med["busy"] / med["idle"]
    print(f"trainer on a shared machine: {model['name']}, {spec['max_steps']} steps x batch "
          f"{spec['hyperparameters']['batch_size']}, backend auto ({runs['idle'][0]['backend']}), median of {repeat}")
    for arm in runs:
        threads = sorted({r["cpu"]["threads"] for r in runs[arm]})
        waits = sorted({str(r["cpu"]["omp_wait_policy"]) for r in runs[arm]})
        busy = [round(r["cpu"]["busy"], 2) for r in runs[arm]]
        times = [round(r["train_duration_s"], 1) for r in runs[arm]]
        print(f"{arm:10s} training {med[arm]:7.1f} s (runs {times}), threads {threads}, wait policy {waits}, "
              f"CPUs busy at start {busy}, nice {runs[arm][0]['cpu']['nice']}, load 1 min before/after "
              f"{[r['loadavg_1m'] for r in runs[arm]]}")
    print(f"ratio busy/idle: x{ratio:.2f} (target <= 2.5); not nice'd: x{med['busy-nice0'] / med['idle']:.2f}")
    print(f"(an 'idle' arm whose CPUs were busy at start was not idle: other work shared the machine; "
          f"{os.cpu_count()} CPUs here)")
    if out_json:
        out_json.write_text(json.dumps({"model": model["name"], "runs": runs, "median_train_s": med,
                                        "ratio_busy_idle": ratio}, indent=2))


def save_calibration(result: dict[str, Any]) -> Path:
    """The two backends' tokens/s, keyed by this machine, where backend=auto reads them on the CPU."""
    probe = subprocess.run([str(trainer_python()), "-c", "from academyd.trainer.backend import calibration_path, "
                            "machine_key; print(calibration_path()); print(machine_key())"],
                           env=env(), capture_output=True, text=True, check=True)
    path_s, machine = probe.stdout.strip().splitlines()
    path = Path(path_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "machine": machine, "measured_by": "bench/bench_trainer.py", "model": result["model"],
        "tokens_per_s": {b: result["backends"][b]["tokens_per_s"] for b in ("unsloth", "peft")},
    }, indent=2))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="~1B-param model on CUDA (needs a GPU trainer env)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random-init Llama instead of SmolLM2")
    p.add_argument("--repeat", type=int, default=None, help="runs per backend (default 2 real, 3 tiny/GPU)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 16 real, 60 tiny, 30 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2 real, 1 tiny)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--busy", action="store_true", help="one core held busy vs idle, same job, backend auto")
    p.add_argument("--save-calibration", action="store_true",
                   help="write the backends' tokens/s for backend=auto on this machine's CPU")
    a = p.parse_args()
    # Stopped (timeout, kill): unwind, so run_busy's `finally` stops the spinning process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    real = not a.gpu and not a.tiny
    repeat = a.repeat or (2 if real else 3)
    threads = a.threads or (2 if real else 1)

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        os.environ["ACADEMY_BASE_CACHE"] = str(work / "base-cache")  # the bench's own, fresh
        if real:
            sys.path.insert(0, str(REPO))
            from academyd.basemodel import resolve_base

            base = resolve_base("", trainer_python=trainer_python())
            model = {"path": base.path, "parameters": 134.5e6, "name": f"SmolLM2-135M-Instruct ({base.name}, Q4_1 "
                     "GGUF dequantized to fp32)"}
        else:
            model = build_model(work / "model", GPU_MODEL if a.gpu else ["--seed", "0"])
            model["name"] = "~1B random-init Llama" if a.gpu else "tiny random-init Llama"
        train, heldout = write_data(work, 400, 40)
        spec = {
            "base_model": model["path"], "dataset_path": str(train), "heldout_path": str(heldout),
            "format": "alpaca", "render": "chat" if real else "plain", "seed": 1,
            "max_steps": a.steps or (30 if a.gpu else 16 if real else 60),
            "cpu_threads": None if a.gpu else threads,
            "hyperparameters": {"learning_rate": 2e-4 if a.gpu or real else 2e-3, "batch_size": 4 if real else 8,
                                "max_length": 128 if real else 256, "logging_steps": 4 if real else 10,
                                "save_steps": 1000, "adjust": False},
        }
        if real:  # dequantize once, outside the timed runs
            warm = subprocess.run([str(trainer_python()), "-m", "academyd.trainer.base", model["path"]], env=env(),
                                  capture_output=True, text=True, check=False)
            if warm.returncode != 0:
                sys.exit(f"the base model could not be prepared:\n{warm.stdout}{warm.stderr[-3000:]}")
        if a.busy:
            busy_mode(work, spec, repeat, model, a.json)
            return
        runs: dict[str, list[dict[str, Any]]] = {"unsloth": [], "peft": []}
        for i in range(repeat):
            for backend in ("unsloth", "peft"):
                r = run_backend(work, f"{backend}-{i}", {**spec, "backend": backend})
                if a.gpu and not r["device"].startswith("cuda"):
                    sys.exit(f"--gpu asked, but the trainer ran on {r['device']}: no CUDA in .venv-trainer/this machine")
                runs[backend].append(r)
                print(f"  run {i + 1}/{repeat} {backend:7s} {r['tokens_per_s']:9.0f} tok/s "
                      f"rss {r['peak_rss_mb']:6.0f} MB  loss {r['final_loss']:.3f}", file=sys.stderr)

    def med(backend: str, key: str) -> float | None:
        values = [r[key] for r in runs[backend] if r[key] is not None]
        return statistics.median(values) if values else None

    device = runs["unsloth"][0]["device"]
    print(f"trainer bench: {model['name']} ({model['parameters'] / 1e6:.1f} M params), {spec['max_steps']} steps x "
          f"batch {spec['hyperparameters']['batch_size']}, device {device}, median of {repeat}")
    print(f"{'backend':8s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'peak GPU MB':>12s} {'final loss':>11s} "
          f"{'held-out base -> adapter':>26s}")
    result: dict[str, Any] = {"device": device, "model": model["name"], "parameters": model["parameters"], "repeat": repeat,
                              "steps": spec["max_steps"], "backends": {}}
    for backend in ("unsloth", "peft"):
        row = {k: med(backend, k) for k in ("tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "final_loss",
                                            "base_heldout_loss", "adapter_heldout_loss", "train_duration_s")}
        result["backends"][backend] = {**row, "runs": runs[backend]}
        gpu = f"{row['peak_gpu_mb']:12.0f}" if row["peak_gpu_mb"] is not None else f"{'-':>12s}"
        print(f"{backend:8s} {row['tokens_per_s']:10.0f} {row['peak_rss_mb']:12.0f} {gpu} {row['final_loss']:11.3f} "
              f"{row['base_heldout_loss']:12.3f} -> {row['adapter_heldout_loss']:.3f}")
    ratio = result["backends"]["unsloth"]["tokens_per_s"] / result["backends"]["peft"]["tokens_per_s"]
    mem_ratio = result["backends"]["unsloth"]["peak_rss_mb"] / result["backends"]["peft"]["peak_rss_mb"]
    result["ratio_tokens_per_s"] = ratio
    result["ratio_peak_rss"] = mem_ratio
    print(f"ratio unsloth/peft: tokens/s x{ratio:.2f}, peak RSS x{mem_ratio:.2f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    if a.save_calibration:
        if device.startswith("cuda"):
            sys.exit("--save-calibration is for the CPU (on CUDA auto tries Unsloth first)")
        print(f"calibration written: {save_calibration(result)}")


if __name__ == "__main__":
    main()
