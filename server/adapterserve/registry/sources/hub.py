"""One adapter per Hugging Face Hub repository: `hf://org/repo[@revision]`, served under
the repo's name (`hf://org/repo#name=<name>` names it otherwise).

huggingface_hub does the fetching, into its own cache (`HF_HUB_CACHE`, `HF_TOKEN` and
`HF_HUB_OFFLINE` as it reads them): from the Hub when it can be reached, with the file
sizes checked against the limits before the download; from the local cache alone when it
cannot (or offline). The adapter's version is the commit the revision resolves to. Only
the adapter's own file names are fetched, then copied from the cache into the staging
folder within their limits, like any source's files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import parse_qs

from adapterserve.registry.records import AdapterInvalid, is_safe_name
from adapterserve.registry.snapshots import SnapshotError, SnapshotStore

from . import Signature
from .remote import cache_key, fetch_into

log = logging.getLogger(__name__)

SCHEME = "hf://"
ETAG_TIMEOUT_S = 10.0  # how long the Hub gets to answer before the local cache is read


class HubSource:
    def __init__(self, spec: str, served_files: tuple[str, ...], timeout_s: float = 120.0):
        body, _, fragment = spec[len(SCHEME):].partition("#")
        repo, _, revision = body.partition("@")
        if repo.count("/") != 1 or not all(is_safe_name(part) for part in repo.split("/")):
            raise ValueError(f"{spec!r}: a Hub source is hf://org/repo[@revision]")
        self.repo = repo
        self.revision = revision or None
        self.name = (parse_qs(fragment).get("name") or [repo.split("/")[1]])[0]
        if not is_safe_name(self.name):
            raise ValueError(f"{spec!r}: {self.name!r} is not a safe model name (add #name=<name>)")
        self.served_files = served_files
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"{SCHEME}{self.repo}" + (f"@{self.revision}" if self.revision else "") + f"#name={self.name}"

    def location(self, name: str) -> str:
        return f"{SCHEME}{self.repo}" + (f"@{self.revision}" if self.revision else "")

    def names(self) -> list[str]:
        return [self.name]

    def has(self, name: str) -> bool:
        return name == self.name

    def signature(self, name: str) -> Signature | None:
        if name != self.name:
            return None
        try:
            return (self._snapshot(download=False)[1],)
        except AdapterInvalid:
            return None

    def signatures(self) -> dict[str, Signature | None]:
        return {self.name: self.signature(self.name)}

    def _snapshot(self, download: bool, file_limits: dict[str, int] | None = None) -> tuple[Path, str]:
        """The cached snapshot folder and its commit: from the Hub when it answers (files
        fetched when `download`), else from the local cache."""
        from huggingface_hub import snapshot_download

        patterns = list(self.served_files)
        try:
            if download and file_limits is not None:
                self._check_sizes(file_limits)
            folder = snapshot_download(
                self.repo, revision=self.revision, allow_patterns=patterns, etag_timeout=ETAG_TIMEOUT_S,
                local_files_only=not download,
            )
        except AdapterInvalid:
            raise
        except Exception as exc:  # the Hub unreachable, the repo or revision unknown, nothing cached
            if not download:
                raise AdapterInvalid(self.name, f"not in the local Hugging Face cache ({type(exc).__name__})") from None
            log.info("adapter %r: the Hub cannot be reached (%s); reading the local cache", self.name, type(exc).__name__)
            return self._snapshot(download=False)
        return Path(folder), Path(folder).name

    def _check_sizes(self, file_limits: dict[str, int]) -> None:
        """Refuse before downloading when the Hub lists a file over its limit."""
        from huggingface_hub import HfApi

        info = HfApi().model_info(self.repo, revision=self.revision, files_metadata=True, timeout=ETAG_TIMEOUT_S)
        for sibling in info.siblings or []:
            most = file_limits.get(sibling.rfilename)
            if most is not None and (sibling.size or 0) > most:
                raise AdapterInvalid(self.name, f"{sibling.rfilename} is larger than the limit of {most} bytes")

    def _within_deadline(self, name: str, file_limits: dict[str, int]) -> tuple[Path, str]:
        """huggingface_hub's download, given at most the fetch's time: past it, the fetch is
        refused (the download may finish in the background, into the Hub cache only)."""
        from concurrent.futures import ThreadPoolExecutor, TimeoutError

        pool = ThreadPoolExecutor(1, thread_name_prefix="hub-fetch")
        try:
            return pool.submit(self._snapshot, True, file_limits).result(timeout=self.timeout_s)
        except TimeoutError:
            raise AdapterInvalid(name, f"fetching it took longer than {self.timeout_s:g} s") from None
        finally:
            pool.shutdown(wait=False)

    def fetch(self, name: str, snapshots: SnapshotStore | None, file_limits: dict[str, int]) -> Path:
        if name != self.name:
            raise AdapterInvalid(name, f"not in {self.location(name)}")
        folder, commit = self._within_deadline(name, file_limits)

        def copy(staging: Path) -> None:
            from huggingface_hub import constants

            cache_root = Path(constants.HF_HUB_CACHE).resolve()  # the cache's files are links to its blobs
            try:
                copied = SnapshotStore(staging.parent).stage(folder, file_limits, inside=cache_root)
            except SnapshotError as exc:
                raise AdapterInvalid(name, str(exc)) from None
            for file in copied.iterdir():
                file.rename(staging / file.name)
            copied.rmdir()

        return fetch_into(snapshots, cache_key(self.describe(), name, commit), file_limits, name, copy)
