"""Small state files that several processes change (the keys file, the unloaded adapters):
written atomically (a reader sees the old file or the new one, never half of one), and
changed under a lock so that two writers never lose each other's change.

The lock is a file beside the state file (`.<name>.lock`), locked with flock: released by
the system when the holder exits, however it exits. A leaf: it imports nothing of
adapterserve.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold `path`'s lock while it is read, changed and written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def write_atomically(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path`'s content with `text` in one step (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(handle, mode)
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
