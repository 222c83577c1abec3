"""Adapters that appear, change or disappear in the sources while the server runs.

Each source gives every adapter a signature that changes with any change of its files
(registry/sources/). The scanner compares the signatures between scans: a new name is
registered, a changed adapter is reloaded (the last good version keeps serving when the
new one is refused), one that is gone is unregistered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapterserve.registry.sources import Signature

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
