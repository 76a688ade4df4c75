"""Writing files so that a kill or a concurrent writer never leaves a half-written one.

:func:`atomic_write` is the one way faststeal writes a results file, a log or a checkpoint: the
data goes to a temporary file with a unique name (``tempfile.mkstemp``) in the destination's
folder, is flushed, and is moved into place with :func:`os.replace` (atomic on POSIX within one
filesystem). Two processes writing the same path therefore never share a temporary file; the
last ``os.replace`` wins and every reader sees one complete version.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

Data = Union[str, bytes, Callable[[IO[bytes]], None]]


def atomic_write(path: Union[str, os.PathLike], data: Data) -> Path:
    """Write ``data`` (text, bytes, or a function that writes to a binary file object) to
    ``path`` atomically; creates the parent folder. Returns ``path`` as a :class:`Path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
