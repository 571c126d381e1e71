"""Reading allowlisted git repositories (GitPython)."""

from __future__ import annotations

from pathlib import Path

import git


def commit_available(repo_path: Path, sha: str) -> bool:
    """True when `sha` names a commit in the repository at `repo_path` (False if the path is no repo)."""
    try:
        repo = git.Repo(repo_path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return False
    try:
        return repo.commit(sha).type == "commit"
    except (ValueError, git.BadName, git.GitCommandError):
        return False
    finally:
        repo.close()
