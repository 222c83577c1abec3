"""Server-owned, content-addressed snapshots of adapter folders.

What is validated is what is served: when an adapter is registered, the files the engine
reads (config, weights, labels) are copied out of the user-writable store into a staging
folder that only the server writes, the staged copy is validated, and it becomes
`<root>/<sha256 of its files>`. The engine loads from there, so editing, truncating or
deleting the store's folder afterwards never reaches a running engine; a store change
takes effect through a reload (validated again, last good version kept on refusal).

Copies, not hard links: a hard link shares the inode, so an in-place write to the store's
file would change the snapshot too. Adapters are megabytes; the copy costs milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CHUNK = 1024 * 1024


class SnapshotError(Exception):
    """A file could not be copied within its size limit."""


class SnapshotStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def stage(self, folder: Path, limits: dict[str, int]) -> Path:
        """Copy each of the named files that exists in `folder` (name -> most bytes) into a
        new staging folder; files that are symlinks are followed only inside `folder`'s
        checks, made by the caller before."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            for name, most in limits.items():
                source = folder / name
                if source.is_file():
                    _bounded_copy(source, staging / name, most)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def commit(self, staging: Path) -> Path:
        """The staged folder under its content address (an identical snapshot is reused)."""
        digest = hashlib.sha256()
        for file in sorted(staging.iterdir()):
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        target = self.root / digest.hexdigest()[:32]
        if target.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
            return target
        try:
            os.rename(staging, target)
        except OSError:  # made meanwhile by another registration of the same content
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)


def _bounded_copy(source: Path, target: Path, most: int) -> None:
    """Copy at most `most` bytes; a longer file is refused, whatever its size said before."""
    copied = 0
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            copied += len(chunk)
            if copied > most:
                raise SnapshotError(f"{source.name} is larger than the limit of {most} bytes")
            writer.write(chunk)
