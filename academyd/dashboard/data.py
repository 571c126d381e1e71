"""What the page shows, read from the store, the data directory and the live feed, as plain JSON values.

The curator's `datasets` table and the arena's registry land on their own schedule; each view says
"not available" instead of failing when its source is missing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from academyd.dashboard.live import LiveFeed
from academyd.settings import Settings
from academyd.store import Store, parse_iso

MAX_CHART_POINTS = 2000
# Approximate tokens (words and punctuation), the curator manifest's own measure.
_TOKEN = re.compile(r"\w+|[^\w\s]")
LENGTH_BINS = (0, 64, 128, 256, 512, 1024, 2048)
_HIST_MAX_BYTES = 64 * 1024 * 1024


def _plain(value: Any) -> Any:
    """A registry entry (dict, dataclass or pydantic model) as JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ---------------------------------------------------------------- runs and loss


def runs(store: Store, settings: Settings, feed: LiveFeed, limit: int = 20) -> list[dict[str, Any]]:
    out = []
    for r in store.recent_runs(limit):
        try:
            r["detail"] = json.loads(r.get("detail") or "{}")
        except ValueError:
            r["detail"] = {}
        start, end = parse_iso(r.get("started_at")), parse_iso(r.get("ended_at"))
        r["duration_s"] = (end - start).total_seconds() if start and end else None
        r["live_points"] = len(feed.progress.get(r["run_id"], ()))
        r["has_loss"] = bool(r["live_points"]) or _loss_file(settings, r) is not None
        out.append(r)
    return out


def _loss_file(settings: Settings, run: dict[str, Any]) -> Path | None:
    """Where an earlier run's loss curve lives: the registry's copy, else the trainer's output dir."""
    candidates = []
    if run.get("version"):
        candidates.append(settings.models_dir / str(run["version"]) / "loss.jsonl")
    run_dir = settings.runs_dir / str(run["run_id"])
    candidates.append(run_dir / "loss.jsonl")
    if run_dir.is_dir():
        # Not a container's output/ (written by the job, not the daemon): its validated copy is in result/.
        candidates.extend(p for p in sorted(run_dir.glob("*/loss.jsonl")) if p.parent.name != "output")
    return next((p for p in candidates if p.is_file()), None)


def loss_curve(settings: Settings, run_id: str, run: dict[str, Any] | None,
               live: list[dict[str, Any]]) -> dict[str, Any]:
    """The chart of `run` (its store row, or None for a run only the live feed knows): the loss file, or
    `live` (the feed's points) when they are more. Reads a file: the page calls it on a worker thread."""
    points: list[dict[str, Any]] = []
    source = "none"
    path = _loss_file(settings, run) if run else None
    if path is not None:
        source = str(path)
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                p = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(p, dict) and isinstance(p.get("step"), (int, float)):
                points.append(p)
    if len(live) > len(points):  # the live ring knows more (the run is going on now)
        points, source = live, "live"
    return {"run_id": run_id, "state": run["state"] if run else None, "source": source,
            "points": _thin(points, MAX_CHART_POINTS)}


def _thin(points: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    kept = [points[int(i * stride)] for i in range(limit - 1)]
    return [*kept, points[-1]]


# ---------------------------------------------------------------- datasets


def datasets(store: Store, limit: int = 5) -> dict[str, Any]:
    if not store.has_table("datasets"):
        return {"available": False, "datasets": []}
    out = []
    for d in store.recent_datasets(limit):
        manifest = _json(d.pop("manifest"), {})
        d["counts"] = _json(d["counts"], {})
        d["dropped"] = _json(d["dropped"], {})
        d["replay"] = manifest.get("replay", 0)
        # rows of the training file that restate a lesson (curator.augment / the paraphraser), among `examples`
        d["restatements"] = (manifest.get("augmentation") or {}).get("restatements", 0)
        d["tokens"] = manifest.get("tokens")
        d["length_histogram"] = {
            "unit": "approx. tokens (words and punctuation)",
            "bins": list(LENGTH_BINS),
            "train": None,  # filled by `histogram` (file reads, off the event loop)
            "heldout": None,
        }
        out.append(d)
    return {"available": True, "datasets": out}


def _json(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


_hist_cache: dict[tuple[str, int, int], list[int]] = {}


def histogram(path: str | None) -> list[int] | None:
    """Counts of examples per length bin (LENGTH_BINS lower edges; the last bin is open)."""
    if not path:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None
    if st.st_size > _HIST_MAX_BYTES:
        return None
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key not in _hist_cache:
        counts = [0] * len(LENGTH_BINS)
        with p.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                n = len(_TOKEN.findall(line))
                idx = max(i for i, lo in enumerate(LENGTH_BINS) if n >= lo)
                counts[idx] += 1
        if len(_hist_cache) > 32:
            _hist_cache.clear()
        _hist_cache[key] = counts
    return _hist_cache[key]


# ---------------------------------------------------------------- models


def models(store: Store, settings: Settings) -> dict[str, Any]:
    """The registry's versions (a tree through parent versions) and the champion."""
    try:
        from academyd.registry import Registry
    except ModuleNotFoundError as exc:
        if exc.name != "academyd.registry":
            raise
        return {"available": False, "models": [], "champion": None}
    registry = Registry(store, settings)
    versions = [_plain(v) for v in registry.list()]
    champion = _plain(registry.champion())
    if isinstance(champion, dict):
        champion = champion.get("version")
    return {"available": True, "models": versions, "champion": champion}


# ---------------------------------------------------------------- DLQ


def dlq(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    if not store.has_table("dlq"):
        return []
    rows = store.recent_dlq(limit)
    from academyd.secrets import scanner

    for r in rows:
        excerpt = r.get("excerpt") or ""
        r["excerpt"] = excerpt[:400] + ("…" if len(excerpt) > 400 else "")
    # stored redacted since the excerpt is made; scanned again here for rows an older version stored
    out: list[dict[str, Any]] = scanner().redact_obj(rows)
    return out
