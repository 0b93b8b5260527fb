"""Where deepcount keeps files it downloads or derives (per user, never inside the repo)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$DEEPCOUNT_CACHE`` or ``$XDG_CACHE_HOME/deepcount`` or ``~/.cache/deepcount``, created."""
    root = os.environ.get("DEEPCOUNT_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepcount"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
