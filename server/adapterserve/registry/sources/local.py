"""The local folder store: a directory whose every sub-folder is one adapter, served under
the folder's name.

A folder's signature is the name, size and modification time of each of its files (and of
the folder itself): cheap to read (no file is opened), and any rewrite of a file or a
config changes it. Fetching copies the named files into the snapshot store's staging
folder from where they resolve at that moment, which must lie inside the store (a folder
or file that resolves outside it, through a symlink or '..', is refused), never through
a link (registry/snapshots.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from adapterserve.registry.records import AdapterInvalid, is_safe_name
from adapterserve.registry.snapshots import SnapshotError, SnapshotStore
from adapterserve.registry.weight_checks import check_weights_present

from . import Signature

log = logging.getLogger(__name__)


class LocalFolderSource:
    def __init__(self, root: Path):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalFolderSource({self.root})"

    def names(self) -> list[str]:
        """Every entry that could be an adapter (hidden entries are skipped)."""
        if not self.root.is_dir():
            log.warning("adapter store %s does not exist", self.root)
            return []
        return sorted(
            entry.name for entry in self.root.iterdir()
            if not entry.name.startswith(".") and (entry.is_dir() or entry.is_symlink())
        )

    def has(self, name: str) -> bool:
        folder = self.root / name
        return folder.exists() or folder.is_symlink()

    def location(self, name: str) -> Path:
        return self.root / name

    def signature(self, name: str) -> Signature | None:
        return folder_signature(self.root / name)

    def signatures(self) -> dict[str, Signature | None]:
        found: dict[str, Signature | None] = {}
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if not name.startswith(".") and is_safe_name(name) and entry.is_dir():
                found[name] = folder_signature(entry)
        return found

    def fetch(self, name: str, snapshots: SnapshotStore | None, file_limits: dict[str, int]) -> Path:
        folder = self.root / name
        check_inside_store(folder, self.root, name)
        if not folder.is_dir():
            raise AdapterInvalid(name, "not a folder")
        if snapshots is None:
            return folder  # read in place (the CLI's reports; never for serving)
        check_weights_present(folder, name)  # before the copy, which takes only the named files
        try:
            return snapshots.stage(folder, file_limits, inside=self.root)
        except SnapshotError as exc:
            raise AdapterInvalid(name, str(exc)) from None


def check_inside_store(folder: Path, store: Path, name: str) -> None:
    """Refuse a folder, or a file in it, that resolves outside the store (symlinks, '..')."""
    root = store.resolve()
    entries = [folder, *folder.iterdir()] if folder.is_dir() else [folder]
    for entry in entries:
        resolved = entry.resolve()
        if not resolved.is_relative_to(root):
            raise AdapterInvalid(name, f"'{entry.name}' resolves outside the adapter store")


def folder_signature(folder: Path) -> Signature | None:
    """The folder's files by (name, size, mtime); None when it cannot be read."""
    try:
        own = folder.stat()
        entries = []
        with os.scandir(folder) as listing:
            for entry in listing:
                if entry.is_file():
                    stat = entry.stat()
                    entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        return None
    return (own.st_mtime_ns, tuple(sorted(entries)))
