"""One adapter in an archive at a URL: `https://host/path/<name>.tar.gz#sha256=<hex>` (or
`.zip`; `&name=<name>` in the fragment names it otherwise).

The archive's SHA-256 is pinned in the setting: the bytes fetched are served only if they
hash to it, so the transport need not be trusted (plain `http://` is accepted for that
reason, e.g. a server inside the cluster). The download is bounded in bytes and time.
Only the adapter's own file names are taken out of the archive, each within its limit,
at its top level or under one top folder; a member with an absolute path or `..`, or a
link (symbolic or hard) in place of an adapter file, refuses the whole archive.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, urlsplit

from adapterserve.registry.records import AdapterInvalid, is_safe_name
from adapterserve.registry.snapshots import CHUNK, SnapshotStore

from . import Signature
from .remote import Deadline, Retryable, cache_key, fetch_into, receive_file, with_retries

SHA256 = re.compile(r"[0-9a-f]{64}")


class ArchiveSource:
    def __init__(self, spec: str, served_files: tuple[str, ...], timeout_s: float = 120.0):
        url = urlsplit(spec)
        fragment = parse_qs(url.fragment)
        self.sha256 = (fragment.get("sha256") or [""])[0].lower()
        if not SHA256.fullmatch(self.sha256):
            raise ValueError(f"{spec!r}: an archive source pins its content: add #sha256=<64 hex digits>")
        file = PurePosixPath(url.path).name
        stem = next((file[: -len(s)] for s in (".tar.gz", ".tgz", ".zip") if file.endswith(s)), None)
        if stem is None:
            raise ValueError(f"{spec!r}: an archive source is a .tar.gz, .tgz or .zip")
        self.kind = "zip" if file.endswith(".zip") else "tar"
        self.name = (fragment.get("name") or [stem])[0]
        if not is_safe_name(self.name):
            raise ValueError(f"{spec!r}: {self.name!r} is not a safe model name (add &name=<name> to the fragment)")
        self.url = url._replace(fragment="").geturl()
        # what admins and logs see: without any user:password@ the URL may carry
        self.shown = url._replace(fragment="", netloc=url.netloc.rpartition("@")[2]).geturl()
        self.served_files = served_files
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"{self.shown}#sha256={self.sha256}&name={self.name}"

    def location(self, name: str) -> str:
        return self.shown

    def names(self) -> list[str]:
        return [self.name]

    def has(self, name: str) -> bool:
        return name == self.name

    def signature(self, name: str) -> Signature | None:
        return (self.sha256,) if name == self.name else None  # pinned: it changes with the setting only

    def signatures(self) -> dict[str, Signature | None]:
        return {self.name: (self.sha256,)}

    def fetch(self, name: str, snapshots: SnapshotStore | None, file_limits: dict[str, int]) -> Path:
        if name != self.name:
            raise AdapterInvalid(name, f"not in {self.url}")
        deadline = Deadline(self.timeout_s, name)
        # the archive may hold the adapter's files plus a little else (headers, a README)
        most = sum(file_limits.values()) + 16 * 1024 * 1024

        def download(staging: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="adapterserve-archive-") as scratch:
                archive = Path(scratch) / "archive"
                with_retries(lambda: self._download(archive, most, deadline), deadline, "downloading the archive")
                digest = _sha256(archive)
                if digest != self.sha256:
                    raise AdapterInvalid(name, f"the archive's sha256 is {digest}, not the pinned {self.sha256}")
                _extract(archive, self.kind, staging, file_limits, self.served_files, name)

        return fetch_into(snapshots, cache_key(self.describe(), name, self.sha256), file_limits, name, download)

    def _download(self, target: Path, most: int, deadline: Deadline) -> None:
        import httpx

        try:
            with httpx.stream("GET", self.url, timeout=min(30.0, max(deadline.left(), 1.0)), follow_redirects=True) as answer:
                if answer.status_code >= 500:
                    raise Retryable(f"HTTP {answer.status_code}")
                if answer.status_code != 200:
                    raise AdapterInvalid(self.name, f"the archive cannot be fetched (HTTP {answer.status_code})")
                target.unlink(missing_ok=True)
                SnapshotStore.receive(target.parent, target.name, deadline.bounded(answer.iter_bytes(CHUNK)), most)
        except httpx.HTTPError as exc:  # its text names the URL: shown without credentials
            raise Retryable(f"{type(exc).__name__}: {str(exc).replace(self.url, self.shown)}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _member_file(member: str, served: tuple[str, ...], name: str, seen: set[str]) -> str | None:
    """The adapter file a member is (at the top or under one folder), or None to skip it;
    an unsafe path, or a second member for the same file, refuses the archive."""
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise AdapterInvalid(name, f"the archive holds an unsafe path {member[:200]!r}")
    parts = [p for p in path.parts if p != "."]
    if len(parts) in (1, 2) and parts[-1] in served:
        if parts[-1] in seen:
            raise AdapterInvalid(name, f"the archive holds {parts[-1]} twice")
        seen.add(parts[-1])
        return parts[-1]
    return None


def _extract(archive: Path, kind: str, staging: Path, limits: dict[str, int], served: tuple[str, ...], name: str) -> None:
    """Take the adapter's files out of the archive into staging, each within its limit."""
    seen: set[str] = set()
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    if info.is_dir():
                        continue
                    file = _member_file(info.filename, served, name, seen)
                    if file is None or file not in limits:
                        continue
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise AdapterInvalid(name, f"{info.filename[:200]!r} in the archive is a link")
                    with bundle.open(info) as member:
                        receive_file(staging, file, iter(lambda: member.read(CHUNK), b""), limits[file])
            return
        with tarfile.open(archive, "r:*") as bundle:
            for member in bundle:
                if member.isdir():
                    continue
                file = _member_file(member.name, served, name, seen)
                if file is None or file not in limits:
                    continue
                if not member.isfile():
                    raise AdapterInvalid(name, f"{member.name[:200]!r} in the archive is not a regular file")
                reader = bundle.extractfile(member)
                receive_file(staging, file, iter(lambda: reader.read(CHUNK), b""), limits[file])
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise AdapterInvalid(name, f"the archive cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None
