"""The page's live feed: recent training progress per run (for reloads) and fan-out to SSE clients.

`LiveFeed.on_event(subject, payload)` is an App listener (called on the event loop). Each SSE client
gets a bounded queue; a client that cannot keep up loses events rather than slowing the daemon, and
the page re-reads /api/status on every event anyway.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, OrderedDict, deque
from typing import Any

from academyd.secrets import scanner

DLQ_PREFIX = "academy.dlq."
DLQ_EXCERPT_CHARS = 400

PROGRESS = "academy.training.progress"
RUN_END = ("academy.training.finished", "academy.training.failed")
# Fields of a progress event the chart keeps; the rest (event_id, schema_version) is noise here.
POINT_FIELDS = ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s",
                "eval_loss", "eta_s", "at")


class LiveFeed:
    def __init__(self, points_per_run: int = 5000, runs_kept: int = 8, client_queue: int = 500) -> None:
        self.points_per_run = points_per_run
        self.runs_kept = runs_kept
        self.client_queue = client_queue
        self.progress: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self.ended: dict[str, str] = {}
        self.verdicts: Counter[str] = Counter()
        self.events_seen: Counter[str] = Counter()
        self._clients: set[asyncio.Queue[tuple[str, dict[str, Any]] | None]] = set()

    # ------------------------------------------------------------ from the App

    def on_event(self, subject: str, payload: dict[str, Any]) -> None:
        payload = public_event(subject, payload)
        self.events_seen[subject] += 1
        run_id = payload.get("run_id")
        if subject == PROGRESS and isinstance(run_id, str):
            ring = self.progress.get(run_id)
            if ring is None:
                ring = self.progress[run_id] = deque(maxlen=self.points_per_run)
                while len(self.progress) > self.runs_kept:
                    old, _ = self.progress.popitem(last=False)
                    self.ended.pop(old, None)
            ring.append({k: payload[k] for k in POINT_FIELDS if payload.get(k) is not None})
        elif subject in RUN_END and isinstance(run_id, str):
            self.ended[run_id] = subject.rsplit(".", 1)[-1]
        elif subject == "academy.evaluation.finished" and payload.get("verdict"):
            self.verdicts[str(payload["verdict"])] += 1
        for q in list(self._clients):
            try:
                q.put_nowait((subject, payload))
            except asyncio.QueueFull:
                pass  # a slow client misses events; it re-reads state on the next one

    # ------------------------------------------------------------ for the page

    def points(self, run_id: str) -> list[dict[str, Any]]:
        return list(self.progress.get(run_id, ()))

    def latest(self, run_id: str) -> dict[str, Any] | None:
        ring = self.progress.get(run_id)
        return ring[-1] if ring else None

    def subscribe(self) -> asyncio.Queue[tuple[str, dict[str, Any]] | None]:
        q: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue(self.client_queue)
        self._clients.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[tuple[str, dict[str, Any]] | None]) -> None:
        self._clients.discard(q)

    def close(self) -> None:
        """Wake every SSE handler so it returns (the server is stopping)."""
        for q in list(self._clients):
            while True:
                try:
                    q.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    q.get_nowait()



def public_event(subject: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What the tokenless live feed may show of an event: everything redacted; of a dead letter (the
    rejected message itself, as it came in) only its subject and a redacted excerpt."""
    if subject.startswith(DLQ_PREFIX):
        raw = json.dumps(payload, ensure_ascii=False, default=str)
        text, _, ok = scanner().clean(raw[: DLQ_EXCERPT_CHARS * 8])
        excerpt = text[:DLQ_EXCERPT_CHARS] if ok else "(withheld: the payload holds a secret that could not be redacted)"
        return {"dead_lettered": True, "original_subject": subject[len(DLQ_PREFIX):], "excerpt": excerpt}
    out: dict[str, Any] = scanner().redact_obj(payload)
    return out
