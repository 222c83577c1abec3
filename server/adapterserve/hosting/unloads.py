"""The adapters an admin unloaded, kept on disk: an unload holds across a restart, and for
every replica that shares the cache directory, until the adapter is loaded again or its
folder changes. One small JSON file per base and set of stores (servers over other stores
sharing the cache directory keep their own), written atomically; replicas that share it
change it under a lock, each reading it again first, so none undoes another's change."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

from adapterserve.state_files import locked, write_atomically

log = logging.getLogger(__name__)


def unloads_path(cache_dir: Path, base_name: str, stores: list[Path]) -> Path:
    stores_key = hashlib.sha256("\n".join(sorted(str(s) for s in stores)).encode()).hexdigest()[:12]
    return Path(cache_dir) / "state" / f"unloaded-{base_name}-{stores_key}.json"


class Unloads:
    def __init__(self, path: Path | None):
        self.path = path  # None: kept in memory only (tests)
        self._names: set[str] = self._read()

    def _read(self) -> set[str]:
        if self.path is None:
            return set()
        try:
            names = json.loads(self.path.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.error("unloaded adapters: %s cannot be read (%s); none are held unloaded", self.path, exc)
            return set()
        return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()

    def _write(self) -> None:
        if self.path is None:
            return
        write_atomically(self.path, json.dumps(sorted(self._names)))

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(sorted(self._names))

    @contextmanager
    def _changing(self):
        if self.path is None:
            yield
            return
        with locked(self.path):
            self._names = self._read()  # what other replicas wrote meanwhile
            yield
            self._write()

    def add(self, name: str) -> None:
        with self._changing():
            self._names.add(name)

    def discard(self, name: str) -> None:
        if name not in self._names:  # every replica is told of every unload: its own set knows
            return
        with self._changing():
            self._names.discard(name)
