"""Pure rules: what counts as a success, what is trivial, which commit messages teach nothing.

Everything here is a function of plain values, so the daemon's handlers (which set the `success`
column) and the curator (which re-applies the rules at build time) agree by construction.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from typing import Any

# ------------------------------------------------------------------ success

# Venom's rule: a lesson is a success when its result contains "sukces" (any case) or "✅".
# A plain substring test also matches "brak sukcesu" ("no success") and friends; a dataset someone must
# trust should not learn failures as successes, so these negations (and a ❌) make it a failure.
_NEGATED_SUCCESS = re.compile(
    r"(brak|bez|nie|żadn\w*|zero|no|not)\s+(było\s+|ma\s+|osiągnięto\s+)?sukces|niesukces|❌",
    re.IGNORECASE,
)
_SUCCESS_WORDS = ("sukces", "success", "succeeded", "ok", "done", "passed", "completed")
SUCCESSFUL_TASK_STATUSES = frozenset({"COMPLETED", "SUCCESS", "SUCCEEDED", "DONE"})


def _says_success(text: str) -> bool:
    lowered = text.casefold()
    if "sukces" not in lowered and "✅" not in text:
        return False
    return not _NEGATED_SUCCESS.search(text)


def _metadata_says_success(metadata: Mapping[str, Any] | None) -> bool:
    if not metadata:
        return False
    flag = metadata.get("success")
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, int | float):
        return flag == 1
    if isinstance(flag, str) and flag.strip().casefold() in {"true", "yes", "tak", "1"}:
        return True
    for key in ("outcome", "status", "result"):
        value = metadata.get(key)
        if isinstance(value, str):
            v = value.strip().casefold()
            if v in _SUCCESS_WORDS or _says_success(value):
                return True
    return False


def is_successful_lesson(result: str | None, metadata: Mapping[str, Any] | None = None) -> bool:
    """Venom's success rule for a lesson (result text, or an explicit success in metadata)."""
    if result and _says_success(result):
        return True
    return _metadata_says_success(metadata)


def is_successful_task(status: str | None) -> bool:
    """A task counts when its status says it completed (COMPLETED, SUCCESS, SUCCEEDED, DONE)."""
    return bool(status) and status.strip().upper() in SUCCESSFUL_TASK_STATUSES


# ------------------------------------------------------------------ trivial content

_PLACEHOLDERS = frozenset(
    {
        "todo", "tbd", "tba", "n/a", "na", "none", "null", "nil", "undefined", "placeholder", "test",
        "testing", "xxx", "...", "…", "-", "--", "?", "foo", "bar", "asdf", "lorem ipsum", "brak", "nic",
        "empty", "no result", "no output", "result", "output", "action", "situation", "fixme", "tmp",
    }
)
_LOREM = re.compile(r"\blorem ipsum\b", re.IGNORECASE)


def squash(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the form used for equality and placeholders."""
    # str.split() splits on exactly what re's \s matches (str.isspace), and is several times faster
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


_LONGEST_PLACEHOLDER = max(map(len, _PLACEHOLDERS)) + 8


def is_placeholder(text: str) -> bool:
    """A field that says nothing: TODO, N/A, lorem ipsum, '...'."""
    if "psum" in text or "PSUM" in text or "Psum" in text:
        if _LOREM.search(text):
            return True
    if len(text) > _LONGEST_PLACEHOLDER * 4:  # cheap: long fields are never a placeholder word
        return False
    s = squash(text).strip(" .!:;")
    return s in _PLACEHOLDERS or (s == "" and text.strip() != "")


def trivial_reason(fields: Mapping[str, str | None], min_chars: int) -> str | None:
    """`empty`, `placeholder` or `too_short` for an example's required fields, None when fine."""
    for value in fields.values():
        if value is None or not value.strip():
            return "empty"
    for value in fields.values():
        if is_placeholder(value or ""):
            return "placeholder"
    if sum(len((v or "").strip()) for v in fields.values()) < min_chars:
        return "too_short"
    return None


# ------------------------------------------------------------------ commit messages (CommitPackFT-style)

_URL = re.compile(r"(https?|ftp|ssh|git)://\S+|www\.\S+|\S+@\S+:\S+", re.IGNORECASE)
_WIP = re.compile(r"^\s*(wip\b|work in progress\b|\[wip\]|fixup!|squash!|amend!|tmp\b|temp\b|checkpoint\b)", re.I)
_WIP_ANYWHERE = re.compile(r"\b(wip|do not merge|don't merge)\b", re.IGNORECASE)
_MERGE = re.compile(r"^\s*(merge (branch|pull request|remote-tracking|tag|commit|[0-9a-f]{7,})\b|merged?\s)", re.I)
_VERSION_BUMP = re.compile(
    r"^\s*(((chore|build|release)(\([^)]*\))?!?:\s*)?"
    r"(bump(ed|s)?\b|release\s+v?\d|releasing\b|prepare (for )?release\b|version\s+v?\d|update version\b"
    r"|set version\b|new version\b|v?\d+(\.\d+)+\b)"
    r"|v?\d+(\.\d+)+([-+.][0-9a-z.]+)?\s*$"
    r"|(chore|build)(\([^)]*\))?:\s*release\b)",
    re.IGNORECASE,
)


def commit_message_reason(message: str | None, *, min_chars: int, max_chars: int, min_words: int) -> str | None:
    """Why a commit message teaches nothing (`message_*` reasons), or None when it is a good target."""
    msg = (message or "").strip()
    if not msg:
        return "message_empty"
    subject = msg.splitlines()[0]
    if _MERGE.search(subject):
        return "message_merge"
    if _WIP.search(subject) or _WIP_ANYWHERE.search(subject):
        return "message_wip"
    if _VERSION_BUMP.search(subject):
        return "message_version_bump"
    if not re.search(r"[^\W\d_]", _URL.sub(" ", msg)):
        return "message_url_only"
    if len(msg) < min_chars or len(subject.split()) < min_words:
        return "message_too_short"
    if len(msg) > max_chars:
        return "message_too_long"
    return None
