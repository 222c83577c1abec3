"""Adapter folders that appear, change or disappear in the stores while the server runs.

A folder's signature is the name, size and modification time of each of its files (and of
the folder itself): cheap to read (no file is opened), and any rewrite of a file or a
config changes it. The host compares the stores' signatures between scans: a new name is
registered, a changed folder is reloaded (the last good version keeps serving when the
new one is refused), a folder that is gone is unregistered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from adapterserve.registry.records import is_safe_name

Signature = tuple


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


def store_signatures(stores: list[Path]) -> dict[str, Signature | None]:
    """Adapter name -> signature of its folder, over every store (the first store wins on a
    duplicate name, as in the registry); hidden and unsafe names are skipped."""
    found: dict[str, Signature | None] = {}
    for store in stores:
        try:
            entries = sorted(Path(store).iterdir())
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name in found or not is_safe_name(name):
                continue
            if entry.is_dir():
                found[name] = folder_signature(entry)
    return found


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def compare(seen: dict[str, Signature | None], now: dict[str, Signature | None], registered: set[str]) -> Changes:
    """What to do after a scan. `seen`: the signatures of the last validation of each name
    (registered or refused), `registered`: the names serving now."""
    changes = Changes()
    for name, signature in sorted(now.items()):
        if name not in seen:
            changes.added.append(name)
        elif seen[name] != signature:
            changes.changed.append(name)
    changes.removed = sorted(name for name in registered if name not in now)
    return changes
