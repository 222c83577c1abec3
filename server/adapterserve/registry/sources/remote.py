"""What every remote source (object storage, a model hub, an archive) does alike when it
fetches an adapter: within a time limit, with retries and back-off on a broken transfer,
into the snapshot store's staging folder, and through the fetch cache (a version fetched
once, on this machine, is copied from its snapshot instead of fetched again).

A fetch that fails leaves nothing behind: its staging folder is removed, and the refusal
(AdapterInvalid) says why, never with credentials in it.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from adapterserve.registry.records import AdapterInvalid
from adapterserve.registry.snapshots import SnapshotError, SnapshotStore

log = logging.getLogger(__name__)

ATTEMPTS = 3  # per file: a dropped connection is retried twice, after 0.5 s then 1 s
FIRST_BACKOFF_S = 0.5


class Retryable(Exception):
    """A transfer that broke in a way worth trying again (a connection, a timeout)."""


class Deadline:
    """The time one fetch may take, all its files and retries together."""

    def __init__(self, seconds: float, name: str):
        self.seconds = seconds
        self.name = name
        self.ends = time.monotonic() + seconds

    def left(self) -> float:
        return self.ends - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise AdapterInvalid(self.name, f"fetching it took longer than {self.seconds:g} s")

    def bounded(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The chunks, checked against the deadline as they arrive."""
        for chunk in chunks:
            self.check()
            yield chunk


def cache_key(source: str, name: str, version: object) -> str:
    """The fetch cache's key for one version of an adapter of a source."""
    return hashlib.sha256(repr((source, name, version)).encode()).hexdigest()[:40]


def with_retries(step: Callable[[], None], deadline: Deadline, what: str) -> None:
    """Run `step` (one file's transfer) until it succeeds, ATTEMPTS times at most while the
    deadline allows; a Retryable failure is retried after a back-off."""
    for attempt in range(ATTEMPTS):
        deadline.check()
        try:
            step()
            return
        except Retryable as exc:
            if attempt == ATTEMPTS - 1:
                raise AdapterInvalid(deadline.name, f"{what} failed {ATTEMPTS} times ({exc})") from None
            pause = min(FIRST_BACKOFF_S * 2**attempt, max(deadline.left(), 0))
            log.info("adapter %r: %s failed (%s); again in %.1f s", deadline.name, what, exc, pause)
            time.sleep(pause)


def fetch_into(
    snapshots: SnapshotStore | None, key: str, file_limits: dict[str, int], name: str,
    download: Callable[[Path], None],
) -> Path:
    """A staging folder with the adapter's files: copied from the snapshot of an earlier
    fetch under `key` when there is one, else filled by `download(staging)`.
    Without a snapshot store (the CLI's read-only reports) a temporary one is used."""
    if snapshots is None:
        snapshots = SnapshotStore(Path(tempfile.mkdtemp(prefix="adapterserve-fetch-")))
    cached = snapshots.fetched(key)
    if cached is not None:
        try:
            return snapshots.stage(cached, file_limits, inside=snapshots.root)
        except SnapshotError:  # damaged meanwhile: fetched again
            log.warning("adapter %r: its cached fetch cannot be read; fetching it again", name)
    staging = snapshots.new_staging()
    try:
        download(staging)
        snapshots.remember(key, staging)
    except SnapshotError as exc:
        snapshots.discard(staging)
        raise AdapterInvalid(name, str(exc)) from None
    except BaseException:
        snapshots.discard(staging)
        raise
    return staging


def receive_file(staging: Path, file: str, chunks: Iterable[bytes], most: int) -> None:
    """Write one fetched file into staging (replacing what a broken attempt left)."""
    (staging / file).unlink(missing_ok=True)
    SnapshotStore.receive(staging, file, chunks, most)
