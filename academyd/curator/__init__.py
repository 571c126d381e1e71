"""Dataset curation: lessons, git history and task conversations into clean, honest training sets.

Public API: `build_dataset`, `BuildResult` (loaded lazily: the daemon's handlers import
`academyd.curator.rules` and `academyd.curator.git` without paying for numpy, rensa and
the secret scanner).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from academyd.curator.build import BuildResult, build_dataset

__all__ = ["BuildResult", "build_dataset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from academyd.curator import build

        return getattr(build, name)
    raise AttributeError(name)
