"""The curator's pipeline: store -> examples -> filters -> secrets -> dedup -> split -> files + manifest.

Synchronous and CPU-bound; the daemon runs it in a worker thread with its own Store. Every source record
ends with a decision (train, heldout, replay, excluded, or dropped with a reason), written beside the
dataset, so anyone can see why an example is in or out.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from academyd import events
from academyd.curator import sources
from academyd.curator.dedup import Deduper, jaccard, normalize, shingle_set
from academyd.curator.examples import ENCODER, SOURCES, Example
from academyd.curator.rules import trivial_reason
from academyd.curator.checks import checks_of
from academyd.curator.families import assign_families, decontaminate, family_of
from academyd.curator.split import replay_sample
from academyd.curator.validation import drop_near, set_aside
from academyd.files import atomic_write_bytes
from academyd.secrets import scanner as secret_scanner
from academyd.settings import Settings
from academyd.store import Store, iso

Progress = Callable[[str, int, int], None]
# Token classes per UTF-8 byte: word (letters, digits, "_", any byte of a non-ASCII character), space,
# punctuation. A token is a run of word bytes or one punctuation byte: the regex \w+|[^\w\s], read
# bytewise (a non-ASCII symbol beside a word joins it), and ~20x faster on the curator's 100k lines.
_BYTE_CLASS = bytes(
    ord("w") if b >= 128 or chr(b).isalnum() or b == 95 else ord(" ") if chr(b).isspace() else ord("p")
    for b in range(256)
)
_SECRET_BATCH = 512


@dataclass
class BuildResult:
    """What a build produced (or why it was refused). `event_payload()` is `academy.dataset.built`'s body."""

    dataset_id: str
    run_id: str | None
    created_at: str
    format: str
    refused: str | None = None
    path: str | None = None
    heldout_path: str | None = None
    manifest_path: str | None = None
    decisions_path: str | None = None
    content_hash: str | None = None
    examples: int = 0
    heldout: int = 0
    replay: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.refused is None

    def event_payload(self) -> dict[str, Any]:
        """`academy.dataset.built` without schema_version/event_id/at (the publisher adds them)."""
        if self.refused is not None:
            raise ValueError(f"dataset {self.dataset_id} was refused ({self.refused}); there is nothing to announce")
        return {
            "dataset_id": self.dataset_id,
            "run_id": self.run_id,
            "format": self.format,
            "path": self.path,
            "heldout_path": self.heldout_path,
            "manifest_path": self.manifest_path,
            "content_hash": self.content_hash,
            "examples": self.examples,
            "heldout": self.heldout,
            "replay": self.replay,
            "counts": self.counts,
            "dropped": self.dropped,
        }

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class _Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = round(self.times.get(stage, 0.0) + now - self._t, 4)
        self._t = now


def build_dataset(
    settings: Settings,
    store: Store,
    *,
    now: datetime,
    run_id: str | None = None,
    progress: Progress | None = None,
    announce: bool = False,
) -> BuildResult:
    """Curate everything the store holds into a dataset under `settings.training_dir`; record it.

    Refused (nothing written to training/, a `datasets` row with the reason) when fewer than
    `curator.min_examples` examples survive. With `announce`, `academy.dataset.built` is queued in the
    outbox in the same transaction that records the dataset.
    """
    cfg = settings.curator
    report = progress or (lambda stage, done, total: None)
    clock = _Clock()
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    stamp = now.strftime("%Y%m%d_%H%M%S")
    decisions: dict[str, dict[str, Any]] = {}
    orders: dict[str, tuple[str, str, int]] = {}
    dropped_by_source: dict[str, Counter[str]] = defaultdict(Counter)
    records: Counter[str] = Counter()

    def drop(source: str, key: str, reason: str, **extra: Any) -> None:
        dropped_by_source[source][reason] += 1
        decisions[key] = {"record": key, "source": source, "decision": "dropped", "reason": reason, **extra}

    # -------------------------------------------------------------- read (+ git)
    examples: list[Example] = []
    readers = [
        ("lesson", lambda: sources.lessons(store, cfg)),
        ("task", lambda: sources.tasks(store, cfg)),
        ("approved", lambda: sources.approved(store, cfg)),
        ("commit", lambda: sources.commits(store, cfg, dict(settings.repos))),
    ]
    for n, (source, reader) in enumerate(readers):
        report("read", n, len(readers))
        for item in reader():
            records[source] += 1
            orders[item.key] = item.order
            if isinstance(item, sources.Dropped):
                drop(item.source, item.key, item.reason)
            else:
                examples.append(item)
        clock.lap("read_git" if source == "commit" else "read")
    report("read", len(readers), len(readers))

    # -------------------------------------------------------------- trivial / over-long
    kept: list[Example] = []
    for ex in examples:
        reason = trivial_reason(ex.required, cfg.min_example_chars)
        if reason is None and sum(len(t) for t in ex.texts()) > cfg.max_example_chars:
            reason = "too_long"
        if reason:
            drop(ex.source, ex.key, reason)
        else:
            kept.append(ex)
    clock.lap("filter")

    # -------------------------------------------------------------- secrets
    scanner = secret_scanner()
    scan_stats: Counter[str] = Counter()
    secret_types: Counter[str] = Counter()
    redacted_examples = 0
    safe_keys: dict[str, str] = {}
    after_secrets: list[Example] = []
    for lo in range(0, len(kept), _SECRET_BATCH):
        report("secrets", lo, len(kept))
        batch = kept[lo : lo + _SECRET_BATCH]
        texts: list[str] = []
        for ex in batch:
            texts.append(ex.key)
            texts.extend(t for _, t in ex.turns)
        results = iter(scanner.clean_many(texts, scan_stats))
        for ex in batch:
            key_text, key_types, _ = next(results)
            if key_types:  # a record id that itself looks like a secret is never written as is
                safe_keys[ex.key] = f"{ex.source}:sha256:{hashlib.sha256(ex.key.encode()).hexdigest()[:24]}"
            cleaned = [next(results) for _ in ex.turns]
            if not key_types and not any(t for _, t, _ in cleaned):
                after_secrets.append(ex)
                continue
            types = Counter[str]()
            for _, t, _ in cleaned:
                types.update(t)
            types.update(key_types)
            secret_types.update(types)
            if cfg.secrets == "drop" or not all(ok for _, _, ok in cleaned):
                reason = "secret" if cfg.secrets == "drop" else "secret_unredactable"
                drop(ex.source, ex.key, reason, secret_types=sorted(types))
                continue
            redacted_examples += 1
            ex.turns = [(role, text) for (role, _), (text, _, _) in zip(ex.turns, cleaned, strict=True)]
            after_secrets.append(ex)
    report("secrets", len(kept), len(kept))
    clock.lap("secrets")

    # -------------------------------------------------------------- dedup (store order: stable as data grows)
    after_secrets.sort(key=lambda e: e.order)
    report("dedup", 0, len(after_secrets))
    deduper = Deduper(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm, k=cfg.shingle_chars)
    verdicts = deduper.run([e.key for e in after_secrets], [e.content() for e in after_secrets])
    unique: list[Example] = []
    for ex, v in zip(after_secrets, verdicts, strict=True):
        if v.kept:
            unique.append(ex)
        else:
            drop(ex.source, ex.key, v.reason or "duplicate", duplicate_of=v.duplicate_of, similarity=v.similarity)
    report("dedup", len(after_secrets), len(after_secrets))
    clock.lap("dedup")

    # -------------------------------------------------------------- families, split, decontamination
    remembered = store.dataset_splits()
    family = family_of(unique, threshold=cfg.family_threshold, num_perm=cfg.num_perm, k=cfg.shingle_chars)
    fsplit = assign_families(unique, family, cfg.heldout_fraction, remembered,
                             min_families=settings.arena.min_heldout_families)
    decontaminated = decontaminate(unique, family, fsplit, threshold=cfg.decontamination_threshold,
                                   num_perm=cfg.num_perm, k=cfg.shingle_chars)
    split, why = fsplit.split, fsplit.why
    train = [ex for ex in unique if split[ex.key] == "train"]
    heldout = [ex for ex in unique if split[ex.key] == "heldout"]
    # Validation families (academyd.curator.validation): out of training, never the gate's held-out ones.
    validation, set_aside_keys, validation_stats = set_aside(
        train, [ex for ex in unique if ex.source == "lesson"], family, why, fmt=cfg.format,
        families=cfg.validation_families, questions=cfg.validation_questions,
        threshold=cfg.decontamination_threshold, num_perm=cfg.num_perm, k=cfg.shingle_chars)
    set_aside_examples = [ex for ex in train if ex.key in set_aside_keys]
    train = [ex for ex in train if ex.key not in set_aside_keys]
    replay: list[Example] = []
    excluded: list[Example] = []
    if cfg.scope == "new":
        earlier = [ex for ex in train if remembered.get(ex.key) == "train"]
        train = [ex for ex in train if ex.key not in remembered]
        seed = hashlib.sha256("\n".join(sorted(e.key for e in train)).encode()).hexdigest()
        picked = set(replay_sample((e.key for e in earlier), round(cfg.replay_fraction * len(train)), seed))
        replay = [ex for ex in earlier if ex.key in picked]
        excluded = [ex for ex in earlier if ex.key not in picked]
    for ex in train:
        decisions[ex.key] = {"record": ex.key, "source": ex.source, "decision": "train", "split_rule": why[ex.key]}
    for ex in heldout:
        decisions[ex.key] = {"record": ex.key, "source": ex.source, "decision": "heldout", "split_rule": why[ex.key]}
    for ex in replay:
        decisions[ex.key] = {"record": ex.key, "source": ex.source, "decision": "replay", "split_rule": "remembered"}
    for ex in excluded:
        decisions[ex.key] = {"record": ex.key, "source": ex.source, "decision": "excluded", "reason": "trained_before"}
    for ex in set_aside_examples:
        decisions[ex.key] = {"record": ex.key, "source": ex.source, "decision": "validation", "split_rule": why[ex.key]}
    train_all = sorted(train + replay, key=lambda e: e.order)
    heldout.sort(key=lambda e: e.order)
    clock.lap("split")
    augmented: list[Example] = []
    aug_stats: dict[str, Any] = {"enabled": cfg.augment}
    if cfg.augment or cfg.paraphraser.url:
        augmented, aug_stats = _augment(train, heldout, family, cfg, settings.data_dir / "cache" / "paraphraser",
                                        lambda done, total: report("paraphrase", done, total))
        train_all += augmented
        clock.lap("augment")
    if augmented and set_aside_examples:
        near = {e.key for e in augmented} - {e.key for e in drop_near(
            augmented, set_aside_examples, threshold=cfg.decontamination_threshold, k=cfg.shingle_chars)[0]}
        train_all = [e for e in train_all if e.key not in near]
        aug_stats["dropped_near_validation"] = len(near)

    # -------------------------------------------------------------- counts
    counts: dict[str, dict[str, int]] = {}
    for source in SOURCES:
        counts[source] = {
            "records": records[source],
            "train": sum(1 for e in train if e.source == source),
            "replay": sum(1 for e in replay if e.source == source),
            "heldout": sum(1 for e in heldout if e.source == source),
            "excluded": sum(1 for e in excluded if e.source == source),
            "dropped": sum(dropped_by_source[source].values()),
        }
    dropped: Counter[str] = Counter()
    for c in dropped_by_source.values():
        dropped.update(c)
    # What survived curation: records, not their restatements (30 lessons restated are still 30 lessons).
    survivors = len(train) + len(replay) + len(heldout)
    created = iso(now) or ""
    taken = store.dataset_ids(f"ds-{stamp}")
    result = BuildResult(
        dataset_id=next(i for i in (f"ds-{stamp}" + (f"_{n}" if n > 1 else "") for n in range(1, 10**6)) if i not in taken),
        run_id=run_id,
        created_at=created,
        format=cfg.format,
        examples=len(train_all),
        heldout=len(heldout),
        replay=len(replay),
        counts=counts,
        dropped=dict(sorted(dropped.items())),
    )
    manifest: dict[str, Any] = {
        "dataset_id": result.dataset_id,
        "run_id": run_id,
        "created_at": created,
        "format": cfg.format,
        "examples": len(train_all),
        "heldout": len(heldout),
        "replay": len(replay),
        "counts": counts,
        "dropped": result.dropped,
        "dropped_by_source": {s: dict(sorted(c.items())) for s, c in sorted(dropped_by_source.items())},
        "secrets": {
            "policy": cfg.secrets,
            "examples_redacted": redacted_examples,
            "examples_dropped": dropped["secret"] + dropped["secret_unredactable"],
            "findings_by_type": dict(sorted(secret_types.items())),
            "scanner": "academyd.secrets (Hyperscan prefilter, rules measured on tests/secrets/corpus.jsonl)",
            "lines_checked": scan_stats["lines_checked"],
        },
        "dedup": {
            "exact": dropped["exact_duplicate"],
            "near": dropped["near_duplicate"],
            "threshold": cfg.near_dup_threshold,
            "shingle_chars": cfg.shingle_chars,
            "num_perm": cfg.num_perm,
            "lsh_bands": deduper.bands,
            "lsh_rows": deduper.rows,
            "lsh_candidates_checked": deduper.candidates_checked,
        },
        "split": {
            "heldout_fraction": cfg.heldout_fraction,
            "rule": "by family (same or near question, one lesson's restatements): sha256(family) / 2^64 < "
                    "fraction per source, at least min(arena.min_heldout_families, a quarter of the families) "
                    "held out; remembered splits win; decontaminated on the prompt",
            "by_rule": dict(Counter(why[e.key] for e in train + heldout)),
            "scope": cfg.scope,
            "replay_fraction": cfg.replay_fraction,
        },
        "families": _family_stats(family, train + replay, heldout, fsplit.moved, decontaminated, cfg),
        "augmentation": aug_stats,
        "validation": validation_stats,
        "settings": cfg.model_dump(mode="json"),
    }
    if survivors < cfg.min_examples:
        result.refused = (
            f"only {survivors} examples survived curation (train {len(train) + len(replay)}, held-out "
            f"{len(heldout)}; restatements not counted); "
            f"at least {cfg.min_examples} are needed (curator.min_examples)"
        )
        manifest["refused"] = result.refused
        clock.lap("write")
        result.timings = manifest["timings_s"] = clock.times
        _record(store, result, manifest, now, announce=False, members=[])
        return result

    # -------------------------------------------------------------- write
    report("write", 0, 3)
    out_dir = settings.training_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _names(out_dir, cfg.format, stamp, taken)
    result.dataset_id = names["id"]
    manifest["dataset_id"] = result.dataset_id
    train_lines = [ex.line(cfg.format) for ex in train_all]
    held_lines = [ex.line(cfg.format) for ex in heldout]
    train_bytes = "".join(line + "\n" for line in train_lines).encode()
    held_bytes = "".join(line + "\n" for line in held_lines).encode()
    content_hash = hashlib.sha256(cfg.format.encode() + b"\0" + train_bytes + b"\0" + held_bytes).hexdigest()
    _write(names["train"], train_bytes)
    _write(names["heldout"], held_bytes)
    checks = checks_of(heldout, [e for e in unique if e.source == "lesson"], family)
    for c in checks:
        c["record"] = safe_keys.get(c["record"], c["record"])
    _write(names["checks"], "".join(ENCODER.encode(c) + "\n" for c in checks).encode())
    if validation:
        for v in validation:
            v["record"] = safe_keys.get(v["record"], v["record"])
        _write(names["validation"], "".join(ENCODER.encode(v) + "\n" for v in validation).encode())
    manifest["families"]["heldout_checkable"] = len({c["family"] for c in checks})
    manifest["families"]["heldout_checkable_examples"] = len(checks)
    report("write", 1, 3)

    def public(key: str) -> str:
        return safe_keys.get(key, key)

    ordered = sorted(decisions.values(), key=lambda d: orders.get(d["record"], ("", "", 0)))
    for d in ordered:
        d["record"] = public(d["record"])
        if d.get("duplicate_of"):
            d["duplicate_of"] = public(d["duplicate_of"])
    _write(names["decisions"], "".join(ENCODER.encode(d) + "\n" for d in ordered).encode())
    manifest.update(
        {
            "content_hash": content_hash,
            "files": {
                "train": str(names["train"]),
                "heldout": str(names["heldout"]),
                "checks": str(names["checks"]),
                **({"validation": str(names["validation"])} if validation else {}),
                "decisions": str(names["decisions"]),
            },
            "sha256": {"train": hashlib.sha256(train_bytes).hexdigest(), "heldout": hashlib.sha256(held_bytes).hexdigest()},
            "tokens": {
                "method": "approximate: words (runs of letters, digits, _ and non-ASCII characters) and ASCII"
                " punctuation characters of the rendered example",
                "train": _token_stats(train_lines),
                "heldout": _token_stats(held_lines),
            },
            "lineage": {
                "train": [public(e.key) for e in train],
                "replay": [public(e.key) for e in replay],
                "heldout": [public(e.key) for e in heldout],
            },
        }
    )
    result.path, result.heldout_path = str(names["train"]), str(names["heldout"])
    result.manifest_path, result.decisions_path = str(names["manifest"]), str(names["decisions"])
    result.content_hash = content_hash
    clock.lap("write")
    result.timings = manifest["timings_s"] = clock.times
    _write(names["manifest"], json.dumps(manifest, ensure_ascii=False, indent=1).encode())
    report("write", 2, 3)
    members = [(public(e.key), "train", result.dataset_id) for e in train]
    members += [(public(e.key), "heldout", result.dataset_id) for e in heldout]
    _record(store, result, manifest, now, announce=announce, members=members)
    clock.lap("record")
    result.timings = clock.times
    report("write", 3, 3)
    return result


def _augment(train: list[Example], heldout: list[Example], family: dict[str, str],
             cfg: Any, cache_dir: Path, progress: Callable[[int, int], None]) -> tuple[list[Example], dict[str, Any]]:
    """Restatements of the training lessons (academyd.curator.augment's templates when curator.augment,
    academyd.curator.paraphrase's model when curator.paraphraser.url), each in its lesson's family, none
    near a held-out question: a restatement that crosses the decontamination threshold is dropped, so no
    held-out question ever reaches training in another lesson's restatement."""
    from academyd.curator.augment import restate
    from academyd.curator.paraphrase import Lesson, paraphrase

    lessons = [ex for ex in train if ex.source == "lesson"]
    by_model, para_stats = paraphrase([Lesson(family[ex.key], ex.prompt(), ex.answer(), ex.answer_key)
                                       for ex in lessons], cfg.paraphraser, cache_dir, progress=progress)
    made: list[Example] = []
    from_paraphraser: set[str] = set()
    for ex, from_model in zip(lessons, by_model, strict=True):
        templates = restate(ex.prompt(), ex.answer(), family=family[ex.key], seed=ex.key,
                            per_kind=cfg.augment_per_kind) if cfg.augment else []
        known = {r.key for r in templates}
        for r in templates + [r for r in from_model if r.key not in known]:
            made.append(Example(source="lesson", key=f"{ex.key}#aug-{r.key}", order=ex.order,
                                instruction=ex.instruction, turns=[("human", r.prompt), ("gpt", r.answer)],
                                family=family[ex.key]))
            family[made[-1].key] = family[ex.key]
            if r.template.startswith("paraphraser"):
                from_paraphraser.add(made[-1].key)
    dropped = 0
    if made and heldout:
        dedup = Deduper(threshold=cfg.decontamination_threshold, num_perm=cfg.num_perm, k=cfg.shingle_chars)
        dedup.run([e.key for e in heldout], [e.prompt() for e in heldout])
        held = {e.key for e in heldout}
        verdicts = dedup.run([e.key for e in made], [e.prompt() for e in made])
        # A restatement near another restatement is matched to it, not to a held-out question it may also be
        # near: those are compared with every held-out question exactly.
        near_made = [e for e, v in zip(made, verdicts, strict=True) if not v.kept and v.duplicate_of not in held]
        held_sh = [shingle_set(normalize(e.prompt()), cfg.shingle_chars) for e in heldout] if near_made else []
        near_held = {e.key for e in near_made if any(
            jaccard(shingle_set(normalize(e.prompt()), cfg.shingle_chars), h) >= cfg.decontamination_threshold
            for h in held_sh)}
        keep = [e for e, v in zip(made, verdicts, strict=True) if v.duplicate_of not in held and e.key not in near_held]
        dropped = len(made) - len(keep)
        made = keep
    return made, {"enabled": cfg.augment, "lessons": len(lessons), "restatements": len(made),
                  "dropped_near_heldout": dropped, "per_kind": cfg.augment_per_kind,
                  "from_paraphraser": sum(1 for e in made if e.key in from_paraphraser),
                  **({"paraphraser": para_stats} if cfg.paraphraser.url else {})}


def _family_stats(family: dict[str, str], train: list[Example], heldout: list[Example],
                  moved: list[dict[str, str]], decontaminated: int, cfg: Any) -> dict[str, Any]:
    sizes = Counter(family[e.key] for e in train + heldout)
    held = {family[e.key] for e in heldout}
    trained = {family[e.key] for e in train}
    return {
        "train": len(trained), "heldout": len(held), "crossing": len(held & trained),
        "largest": max(sizes.values(), default=0),
        "mean_size": round(statistics.fmean(sizes.values()), 2) if sizes else 0,
        "moved": len(moved), "decontaminated": decontaminated, "moves": moved[:200],
        "family_threshold": cfg.family_threshold, "decontamination_threshold": cfg.decontamination_threshold,
    }


def _names(out_dir: Path, fmt: str, stamp: str, taken: set[str]) -> dict[str, Any]:
    """Venom's names; a second build in the same second gets a suffix instead of overwriting."""
    suffix, n = "", 1
    while (out_dir / f"dataset_{fmt}_{stamp}{suffix}.jsonl").exists() or f"ds-{stamp}{suffix}" in taken:
        n += 1
        suffix = f"_{n}"
    tag = f"{fmt}_{stamp}{suffix}"
    return {
        "id": f"ds-{stamp}{suffix}",
        "train": out_dir / f"dataset_{tag}.jsonl",
        # Not `dataset_*.jsonl`: a tool that globs for datasets must never pick up the held-out set.
        "heldout": out_dir / f"heldout_{tag}.jsonl",
        "decisions": out_dir / f"decisions_{tag}.jsonl",
        # what a right answer to each checkable held-out example contains (academyd.curator.checks)
        "checks": out_dir / f"checks_{tag}.jsonl",
        # the validation families' questions and keys (academyd.curator.validation), when set aside
        "validation": out_dir / f"validation_{tag}.jsonl",
        "manifest": out_dir / f"dataset_{tag}.manifest.json",
    }


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _count_tokens(line: str) -> int:
    classes = line.encode().translate(_BYTE_CLASS)
    return len(classes.replace(b"p", b" ").split()) + classes.count(b"p")


def _token_stats(lines: list[str]) -> dict[str, float]:
    if not lines:
        return {"count": 0}
    sizes = sorted(_count_tokens(line) for line in lines)

    def pct(p: float) -> int:
        return sizes[min(len(sizes) - 1, int(p * len(sizes)))]

    return {
        "count": len(sizes),
        "total": sum(sizes),
        "min": sizes[0],
        "mean": round(statistics.fmean(sizes), 1),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": sizes[-1],
    }


def _record(
    store: Store,
    result: BuildResult,
    manifest: dict[str, Any],
    now: datetime,
    *,
    announce: bool,
    members: list[tuple[str, str, str]],
) -> None:
    slim = {k: v for k, v in manifest.items() if k != "lineage"}
    # Built (and validated) before anything is written: a refused event leaves no dataset row behind.
    built = (events.envelope("academy.dataset.built", result.dataset_id, now, result.event_payload(),
                             msg_id=f"academy.dataset.built:{result.dataset_id}")
             if announce and result.ok else None)
    with store.transaction():
        store.insert_dataset(
            dataset_id=result.dataset_id, run_id=result.run_id, created_at=result.created_at, format=result.format,
            path=result.path, heldout_path=result.heldout_path, manifest_path=result.manifest_path,
            content_hash=result.content_hash, examples=result.examples, heldout=result.heldout,
            counts=result.counts, dropped=result.dropped, refused=result.refused, manifest=slim,
        )
        store.add_dataset_members(members)
        if built is not None:
            events.enqueue(store, built, now)
