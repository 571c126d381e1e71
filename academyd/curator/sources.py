"""The three sources, read from the store: each record becomes an Example or a reasoned drop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from academyd.attribution import FINISHED_RANK, status_rank
from academyd.curator import git as gitsrc
from academyd.curator import rules
from academyd.curator.examples import (
    COMMIT_INSTRUCTION,
    TASK_INSTRUCTION,
    Example,
    history_turns,
    lesson_answer,
)
from academyd.settings import CuratorSettings
from academyd.store import Store

TRUNCATED = "\n[... diff truncated]"


@dataclass(frozen=True)
class Dropped:
    source: str
    key: str
    order: tuple[str, str, int]
    reason: str


Item = Example | Dropped


def lessons(store: Store, cfg: CuratorSettings) -> Iterator[Item]:
    rows = store.lesson_rows()
    for seq, lesson_id, situation, action, result, feedback, metadata, received_at in rows:
        key = f"lesson:{lesson_id}"
        order = (received_at, "lesson", seq)
        meta = json.loads(metadata) if metadata else {}
        if not rules.is_successful_lesson(result, meta if isinstance(meta, dict) else {}):
            yield Dropped("lesson", key, order, "failure")
            continue
        meta = meta if isinstance(meta, dict) else {}
        yield Example(
            source="lesson",
            key=key,
            order=order,
            instruction=cfg.system_prompt,
            turns=[("human", situation.strip()), ("gpt", lesson_answer(action, feedback))],
            required={"situation": situation, "action": action},
            answer_key=meta.get("answer_key"),
        )


def tasks(store: Store, cfg: CuratorSettings) -> Iterator[Item]:
    rows = store.task_rows()
    for seq, task_id, content, result, status, history, received_at in rows:
        key = f"task:{task_id}"
        order = (received_at, "task", seq)
        if status_rank(status) < FINISHED_RANK:  # PENDING, PROCESSING (the bridge publishes them, #20)
            yield Dropped("task", key, order, "unfinished")
            continue
        if not rules.is_successful_task(status):
            yield Dropped("task", key, order, "failure")
            continue
        turns = history_turns(json.loads(history) if history else None, task_id)
        request = (content or "").strip()
        if turns and turns[-1][0] == "human":  # the history may already end with this very request
            last = turns.pop()[1]
            if rules.squash(last) != rules.squash(request):
                request = f"{last}\n\n{request}"
        turns += [("human", request), ("gpt", (result or "").strip())]
        yield Example(
            source="task",
            key=key,
            order=order,
            instruction=TASK_INSTRUCTION,
            turns=turns,
            required={"content": content, "result": result},
        )


def approved(store: Store, cfg: CuratorSettings) -> Iterator[Item]:
    """Answers a user approved with a thumbs up (Venom's hidden_prompts.jsonl, `prompt.approved`, #20): the
    prompt and the approved answer, as Venom's own learning loop uses them."""
    for seq, event_id, task_id, prompt, answer, _intent, received_at in store.approved_pair_rows():
        yield Example(
            source="approved",
            key=f"approved:{task_id or event_id}",
            order=(received_at, "approved", seq),
            instruction=cfg.system_prompt,  # the chat it came from: Venom's system prompt, the user's prompt
            turns=[("human", prompt.strip()), ("gpt", answer.strip())],
            required={"prompt": prompt, "approved_response": answer},
        )


def commits(store: Store, cfg: CuratorSettings, repos: dict[str, Path]) -> Iterator[Item]:
    rows = store.commit_rows()
    by_repo: dict[str, list[tuple[int, str, str]]] = {}
    for seq, repo, sha, received_at in rows:
        by_repo.setdefault(repo, []).append((seq, sha, received_at))
    for name in sorted(by_repo):
        entries = by_repo[name]
        keyed = [(f"commit:{name}:{sha}", (received_at, "commit", seq), sha) for seq, sha, received_at in entries]
        if name not in repos:
            for key, order, _ in keyed:
                yield Dropped("commit", key, order, "repo_not_allowed")
            continue
        try:
            repo = gitsrc.open_repo(Path(repos[name]))
        except gitsrc.RepoNotAllowed:
            for key, order, _ in keyed:
                yield Dropped("commit", key, order, "repo_unavailable")
            continue
        with repo:
            full = gitsrc.existing_commits(repo, [sha for _, _, sha in keyed])
            data = {c.sha: c for c in gitsrc.read_commits(repo, sorted(set(full.values())), cap=cfg.diff_drop_chars)}
        for key, order, sha in keyed:
            commit = data.get(full.get(sha, ""))
            if commit is None:
                yield Dropped("commit", key, order, "commit_missing")
                continue
            yield from _commit_item(key, order, commit, cfg)


def _commit_item(key: str, order: tuple[str, str, int], c: gitsrc.CommitData, cfg: CuratorSettings) -> Iterator[Item]:
    if c.is_merge:
        yield Dropped("commit", key, order, "merge_commit")
        return
    reason = rules.commit_message_reason(
        c.message,
        min_chars=cfg.commit_message_min_chars,
        max_chars=cfg.commit_message_max_chars,
        min_words=cfg.commit_message_min_words,
    )
    if reason:
        yield Dropped("commit", key, order, reason)
        return
    if c.diff_chars == 0 or not c.diff.strip():
        yield Dropped("commit", key, order, "empty_diff")
        return
    if c.diff_chars > cfg.diff_drop_chars:
        yield Dropped("commit", key, order, "diff_too_long")
        return
    diff = c.diff
    if c.diff_chars > cfg.diff_truncate_chars:
        cut = diff.rfind("\n", 0, cfg.diff_truncate_chars)
        diff = diff[: cut if cut > cfg.diff_truncate_chars // 2 else cfg.diff_truncate_chars] + TRUNCATED
    yield Example(
        source="commit",
        key=key,
        order=order,
        instruction=COMMIT_INSTRUCTION,
        turns=[("human", diff), ("gpt", c.message)],
        required={"diff": diff, "message": c.message},
    )
