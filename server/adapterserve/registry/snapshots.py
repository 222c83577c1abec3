"""Server-owned, content-addressed snapshots of adapter folders.

What is validated is what is served: when an adapter is registered, the files the engine
reads (config, weights, labels) are copied out of the user-writable store into a staging
folder that only the server writes, the staged copy is validated, and it becomes
`<root>/<sha256 of its files>`. The engine loads from there, so editing, truncating or
deleting the store's folder afterwards never reaches a running engine; a store change
takes effect through a reload (validated again, last good version kept on refusal).

Copies, not hard links: a hard link shares the inode, so an in-place write to the store's
file would change the snapshot too. Adapters are megabytes; the copy costs milliseconds.

A file is copied from where it resolves at the moment of the copy, which must lie inside
the store, and opened without following links: a link swapped in after the validation's
check reads nothing outside. A snapshot found under its address is read again before it is
reused (a damaged one is replaced). Snapshots no registered version refers to are removed
by `collect` once nobody has touched them for a grace period (a version being drained may
still be loaded from its snapshot; every server sharing the folder touches the ones it
uses, `touch`), so rewriting a store folder over and over does not fill the disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
FETCHED = ".fetched"  # the index of fetches from remote sources (see `fetched`)


class SnapshotError(Exception):
    """A file could not be copied within its size limit."""


class SnapshotStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def stage(self, folder: Path, limits: dict[str, int], inside: Path | None = None) -> Path:
        """Copy each of the named files that exists in `folder` (name -> most bytes) into a
        new staging folder: from where it resolves now, which must lie inside `inside` (the
        store; default: the folder), and never through a link."""
        root = Path(os.path.realpath(inside or folder))
        staging = self.new_staging()
        try:
            for name, most in limits.items():
                source = folder / name
                if not os.path.lexists(source):
                    continue
                resolved = Path(os.path.realpath(source))
                if not resolved.is_relative_to(root):
                    raise SnapshotError(f"{name} resolves outside the adapter store")
                _bounded_copy(resolved, staging / name, most)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def new_staging(self) -> Path:
        """An empty staging folder only the server writes (a source fetches into it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))

    @staticmethod
    def receive(staging: Path, name: str, chunks, most: int) -> None:
        """Write file `name` of a fetched adapter into `staging` from `chunks` (bytes), at
        most `most` bytes: a longer one is refused, whatever its size was said to be."""
        if "/" in name or name in ("", ".", ".."):
            raise SnapshotError(f"{name!r} is not a file name")
        written = 0
        with (staging / name).open("xb") as writer:
            for chunk in chunks:
                written += len(chunk)
                if written > most:
                    raise SnapshotError(f"{name} is larger than the limit of {most} bytes")
                writer.write(chunk)

    # --- fetched adapters, by their source's version -----------------------------------
    # A remote source's fetch is keyed by (source, name, the version it lists): the key's
    # file under FETCHED holds the address of the snapshot made from that fetch, so a
    # restart, another engine or another server sharing this folder copies the snapshot
    # instead of fetching again. The snapshot is still read again and validated by value.
    def fetched(self, key: str) -> Path | None:
        """The snapshot a fetch under `key` became, if it is still here."""
        try:
            address = (self.root / FETCHED / key).read_text().strip()
        except OSError:
            return None
        folder = self.root / address
        return folder if len(address) == 32 and folder.is_dir() else None

    def remember(self, key: str, staging: Path) -> None:
        """Record that a fetch under `key` produced the files in `staging`."""
        index = self.root / FETCHED
        index.mkdir(parents=True, exist_ok=True)
        temporary = index / f".{key}.{os.getpid()}"
        temporary.write_text(_address(staging))
        os.replace(temporary, index / key)

    def commit(self, staging: Path) -> Path:
        """The staged folder under its content address (an identical snapshot is reused once
        it has been read again and still holds that content; else it is replaced)."""
        address = _address(staging)
        target = self.root / address
        if target.is_dir():
            if _address(target) == address:
                shutil.rmtree(staging, ignore_errors=True)
                os.utime(target)  # in use again: not collected before its grace period
                return target
            log.warning("snapshot %s no longer holds its content; replacing it", target.name)
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # made meanwhile by another registration of the same content
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @staticmethod
    def discard(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def touch(self, in_use: set[Path]) -> None:
        """Mark snapshots as in use now (their folder's time): `collect`, here or in another
        server sharing the folder, spares them for its grace period."""
        for path in in_use:
            try:
                os.utime(self.root / Path(path).name)
            except OSError:  # gone meanwhile: registered again on its next validation
                continue

    def collect(self, keep: set[Path], grace_s: float = 600.0) -> list[str]:
        """Remove the snapshots (and abandoned staging folders) not in `keep` and untouched
        for `grace_s`; the names removed."""
        if not self.root.is_dir():
            return []
        kept = {Path(p).name for p in keep}
        removed = []
        for entry in self.root.iterdir():
            try:
                idle = time.time() - entry.lstat().st_mtime
            except OSError:
                continue
            if entry.name in kept or entry.name == FETCHED or idle < grace_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
        if removed:
            log.info("snapshots: removed %d that no adapter version uses", len(removed))
        return removed


def _address(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def _bounded_copy(source: Path, target: Path, most: int) -> None:
    """Copy at most `most` bytes of a regular file, opened without following a link; a
    longer file is refused, whatever its size said before."""
    try:
        descriptor = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SnapshotError(f"{source.name} cannot be opened ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise SnapshotError(f"{source.name} is not a regular file")
    copied = 0
    with os.fdopen(descriptor, "rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            copied += len(chunk)
            if copied > most:
                raise SnapshotError(f"{source.name} is larger than the limit of {most} bytes")
            writer.write(chunk)
