"""Adapter sources: where adapters are kept, behind one small interface.

A source lists the adapter names it holds, says when one changed (a signature that is
cheap to read and differs after any change), and fetches an adapter's files into a
staging folder of the server's snapshot store, within the size of each file. What a
source fetches is then validated by value like any other adapter (registry/validation.py)
and served from its snapshot; a source never decides what is served.

The sources, one module each: `local.py` (each sub-folder of a directory is one adapter),
`s3.py` (S3 and S3-compatible stores), `hub.py` (Hugging Face Hub repos) and `archive.py`
(an https archive with a pinned sha256); `remote.py` holds what the remote ones share
(deadline, retries, the fetch cache). `open_source` turns what a user typed
(`--adapter-sources`, `--adapter-dirs`) into a source; a new kind of source is one module
implementing `AdapterSource`, plus its case in `open_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from adapterserve.registry.snapshots import SnapshotStore

Signature = tuple  # a source's token for one version of an adapter (compare for equality only)


class AdapterSource(Protocol):
    def describe(self) -> str:
        """What the source is, for admins and logs (a path, a URL without credentials)."""
        ...

    def names(self) -> list[str]:
        """The candidate adapter names it holds (raises OSError when it cannot be listed)."""
        ...

    def has(self, name: str) -> bool:
        ...

    def signature(self, name: str) -> Signature | None:
        """The version of `name` as it is now; None when it cannot be read."""
        ...

    def signatures(self) -> dict[str, Signature | None]:
        """Every safe adapter name it holds -> its signature (one listing)."""
        ...

    def location(self, name: str) -> Path | str:
        """Where `name` is, as shown with a refusal (a local path; a remote source's URL)."""
        ...

    def fetch(self, name: str, snapshots: SnapshotStore | None, file_limits: dict[str, int]) -> Path:
        """The adapter's files in a staging folder of `snapshots` (each named file within its
        bytes), or, without a snapshot store, a folder to read in place (local sources only:
        the CLI's read-only reports). Raises AdapterInvalid with the reason."""
        ...


def open_source(spec: str | Path, timeout_s: float = 120.0) -> AdapterSource:
    """The source a setting names: `s3://bucket/prefix`, `hf://org/repo[@revision]`,
    `https://.../adapter.tar.gz#sha256=<hex>`, or else a local directory. Raises
    ValueError for a malformed one (no network is touched until it is listed)."""
    from adapterserve.registry.limits import SERVED_FILES

    text = str(spec)
    if text.startswith("s3://"):
        from .s3 import S3Source

        return S3Source(text, SERVED_FILES, timeout_s)
    if text.startswith("hf://"):
        from .hub import HubSource

        return HubSource(text, SERVED_FILES, timeout_s)
    if text.startswith(("https://", "http://")):
        from .archive import ArchiveSource

        return ArchiveSource(text, SERVED_FILES, timeout_s)
    if "://" in text:
        raise ValueError(f"{text!r}: an adapter source is a directory, s3://, hf:// or https://")
    from .local import LocalFolderSource

    return LocalFolderSource(Path(text).expanduser().resolve())


def local_stores(paths: list[Path]) -> list[AdapterSource]:
    """Local folder stores at these paths, as given."""
    from .local import LocalFolderSource

    return [LocalFolderSource(Path(p)) for p in paths]


def first_holding(sources: list[AdapterSource], name: str) -> AdapterSource | None:
    """The first source that holds `name` (first source wins on a duplicate name)."""
    return next((source for source in sources if source.has(name)), None)


def all_signatures(sources: list[AdapterSource], holders: dict | None = None) -> dict[str, Signature | None]:
    """Every name over every source (first source wins) -> its signature; a source that
    cannot be listed contributes nothing (its adapters read as removed until it is back).
    `holders`, when given, is filled with name -> the source holding it."""
    found: dict[str, Signature | None] = {}
    for source in sources:
        try:
            listed = source.signatures()
        except OSError:
            continue
        for name, signature in listed.items():
            if name not in found:
                found[name] = signature
                if holders is not None:
                    holders[name] = source
    return found
