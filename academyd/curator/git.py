"""Git history as training pairs (diff -> commit message), read through GitPython.

Only repositories named in the configured allowlist (name -> local path) are ever opened. Reads are
batched: one `git cat-file --batch-check` to learn which commits exist, one `git log --no-walk --stdin -p`
for all their messages and diffs, streamed so that a huge diff costs memory only up to the drop limit.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import git
from git.exc import GitCommandError, InvalidGitRepositoryError, NoSuchPathError


class RepoNotAllowed(Exception):
    """A repository name that is not in the allowlist (or whose path is not a git repository)."""


@dataclass(frozen=True)
class CommitData:
    sha: str
    parents: tuple[str, ...]
    author: str
    authored_at: str
    message: str
    diff: str  # at most `cap` characters
    diff_chars: int  # the full length, even when `diff` was cut

    @property
    def is_merge(self) -> bool:
        return len(self.parents) > 1


def resolve_repo(repos: dict[str, Path], name: str) -> Path:
    """The allowlisted path for `name`; RepoNotAllowed (with what to do) otherwise."""
    if name not in repos:
        known = ", ".join(sorted(repos)) or "none configured"
        raise RepoNotAllowed(
            f"repository {name!r} is not in the allowlist ({known}); add it under [repos] in the config "
            f"(name = \"/path/to/repo\") or ACADEMY_REPOS"
        )
    return Path(repos[name])


def open_repo(path: Path) -> git.Repo:
    try:
        return git.Repo(path)
    except (InvalidGitRepositoryError, NoSuchPathError) as exc:
        raise RepoNotAllowed(f"{path} is not a git repository ({exc.__class__.__name__})") from None


def commit_available(repo_path: Path, sha: str) -> bool:
    """Whether `sha` names a commit in the repository at `repo_path` (fast: one cat-file)."""
    try:
        repo = git.Repo(repo_path)
    except (InvalidGitRepositoryError, NoSuchPathError):
        return False
    try:
        repo.git.cat_file("-e", f"{sha}^{{commit}}")
    except GitCommandError:
        return False
    finally:
        repo.close()
    return True


def _stdin(lines: list[str]) -> tempfile.SpooledTemporaryFile[bytes]:
    f = tempfile.TemporaryFile()
    f.write(("\n".join(lines) + "\n").encode())
    f.seek(0)
    return f  # type: ignore[return-value]


def existing_commits(repo: git.Repo, shas: list[str]) -> dict[str, str]:
    """Map each given sha (full or abbreviated) that names a commit to its full sha."""
    if not shas:
        return {}
    with _stdin([f"{s}^{{commit}}" for s in shas]) as f:
        out = repo.git.execute(["git", "cat-file", "--batch-check"], istream=f)
    found = {}
    for sha, line in zip(shas, str(out).splitlines(), strict=False):
        parts = line.split()
        if len(parts) == 3 and parts[1] == "commit":
            found[sha] = parts[0]
    return found


_FORMAT = "%x00%H%x00%P%x00%an <%ae>%x00%aI%x00%B%x00"
_FIELDS = 6  # sha, parents, author, date, message, diff


def read_commits(repo: git.Repo, full_shas: list[str], *, cap: int) -> Iterator[CommitData]:
    """Messages and diffs of existing commits, in one `git log` process; diffs kept up to `cap` chars."""
    if not full_shas:
        return
    cmd = [
        "git", "-c", "core.quotepath=off", "log", "--no-walk=unsorted", "--stdin", f"--format={_FORMAT}",
        "-p", "--no-color", "--no-ext-diff", "--no-textconv", "--diff-merges=off", "--encoding=UTF-8",
    ]
    with _stdin(full_shas) as f:
        proc = repo.git.execute(cmd, istream=f, as_process=True)
        try:
            fields: list[str] = []
            for token, full_len in _tokens(proc.stdout, cap):
                fields.append(token)
                if len(fields) == _FIELDS:
                    yield _commit(fields, full_len)
                    fields = []
        finally:
            proc.wait()


def _commit(fields: list[str], diff_len: int) -> CommitData:
    sha, parents, author, date, message, diff = fields
    lead = len(diff) - len(diff.lstrip("\n"))
    return CommitData(
        sha=sha.strip(),
        parents=tuple(parents.split()),
        author=author,
        authored_at=date,
        message=message.strip(),
        diff=diff[lead:].rstrip("\n"),
        diff_chars=max(0, diff_len - lead),
    )


def _tokens(stream: object, cap: int) -> Iterator[tuple[str, int]]:
    """NUL-separated tokens of a byte stream; each kept up to `cap` characters, with its full length.

    The output starts with a NUL, so the first (empty) token is skipped; the last one ends at EOF.
    """
    buf: list[str] = []
    kept = 0
    total = 0
    first = True
    read = stream.read  # type: ignore[attr-defined]
    decoder = _decoder()
    while True:
        chunk = read(1 << 16)
        text = decoder.decode(chunk, final=not chunk)
        parts = text.split("\x00")
        for i, part in enumerate(parts):
            if i > 0:  # a NUL ended the previous token
                if not first:
                    yield "".join(buf), total
                first = False
                buf, kept, total = [], 0, 0
            total += len(part)
            if kept < cap:
                piece = part[: cap - kept + 1]  # one past the cap shows that it was exceeded
                buf.append(piece)
                kept += len(piece)
        if not chunk:
            break
    if not first:
        yield "".join(buf), total


def _decoder():  # type: ignore[no-untyped-def]
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@dataclass(frozen=True)
class HistoryEntry:
    sha: str
    parents: tuple[str, ...]
    author: str
    committed_at: str
    message: str


def walk_history(repo: git.Repo, rev: str = "HEAD") -> Iterator[HistoryEntry]:
    """Every commit reachable from `rev`, oldest first (for a first dataset: `dataset backfill-git`)."""
    out = repo.git.log(rev, "--reverse", "--format=%x00%H%x00%P%x00%an <%ae>%x00%cI%x00%B")
    parts = str(out).split("\x00")[1:]
    for i in range(0, len(parts) - 4, 5):
        sha, parents, author, date, message = parts[i : i + 5]
        yield HistoryEntry(sha.strip(), tuple(parents.split()), author, date.strip(), message.strip())


def current_branch(repo: git.Repo) -> str:
    try:
        return repo.active_branch.name
    except TypeError:  # detached HEAD
        return "HEAD"
