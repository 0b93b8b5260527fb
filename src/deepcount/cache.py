"""Files deepcount writes: where it keeps what it downloads or derives (per user, never inside
the repo), and writing a file whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: renamed onto ``path`` when the body ends
    normally, removed when it raises, so readers (and other processes writing the same file)
    only ever see no file or a whole one.  The name is ``path``'s, this process's id (two
    writers never share it) and ``.part`` (write NumPy arrays through an open file: ``np.save``
    adds ``.npy`` to a name without it).  The file gets the permissions a plain ``open`` would
    give it (0666 less the umask): some writers (safetensors) create theirs readable by the owner
    alone, which would hide a shared model or result from everyone else on the machine."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if tmp.is_file():
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
