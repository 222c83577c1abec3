"""Adapters in S3 or an S3-compatible store (MinIO, R2, Ceph, moto): `s3://bucket/prefix`,
where each `<prefix>/<name>/` holds one adapter's files.

boto3 finds the endpoint (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`), the region and the
credentials the standard way (environment, `~/.aws/config` and `credentials`, instance
roles); none of them is ever part of a message or a log line.

Listing is paged (1,000 keys a page), one pass over the prefix for every adapter at once.
An adapter's version is the (file, ETag, size) of the files the server reads from it.
A fetch reads each file with `If-Match: <the ETag listed>`, so an object replaced during
the fetch is a refusal (412), never a mix of two versions; and the adapter is listed again
after its last file: any change meanwhile is a refusal too. Sizes are checked against the
limits in the listing, before any byte is read, and again while reading.
Keys are never paths here: a name is one key segment that must be a safe model name, and
only the known file names directly under it are read (`<prefix>/a/../b` reads nothing).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from adapterserve.registry.limits import CONFIG_FILE
from adapterserve.registry.records import AdapterInvalid, is_safe_name
from adapterserve.registry.snapshots import CHUNK, SnapshotStore

from . import Signature
from .remote import Deadline, Retryable, cache_key, fetch_into, receive_file, with_retries

log = logging.getLogger(__name__)

SCHEME = "s3://"
# A hung connection is noticed within this; the fetch's own deadline bounds the whole.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0

Files = dict[str, tuple[str, int]]  # file name -> (ETag, size)


class S3Source:
    def __init__(self, spec: str, served_files: tuple[str, ...], timeout_s: float = 120.0):
        bucket, _, prefix = spec[len(SCHEME):].partition("/")
        if not bucket:
            raise ValueError(f"{spec!r}: an S3 source is s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.served_files = served_files  # the only keys read under an adapter's name
        self.timeout_s = timeout_s
        self._client_lock = threading.Lock()
        self._client = None

    def describe(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Source({self.describe()})"

    def location(self, name: str) -> str:
        return f"{self.describe()}/{name}"

    # --- listing ----------------------------------------------------------------------
    def client(self):
        with self._client_lock:  # boto3 clients are thread-safe; making one is not
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client("s3", config=Config(
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"max_attempts": 3, "mode": "standard"},
                ))
            return self._client

    def _base(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _listing(self, under: str = "") -> dict[str, Files]:
        """Adapter name -> its served files, for every name under `<prefix>/<under>` (paged).
        Raises OSError when the bucket cannot be listed."""
        from botocore.exceptions import BotoCoreError, ClientError

        base = self._base()
        found: dict[str, Files] = {}
        try:
            pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base + under)
            for page in pages:
                for item in page.get("Contents", []):
                    name, _, file = item["Key"][len(base):].partition("/")
                    if not name:
                        continue
                    files = found.setdefault(name, {})
                    if file in self.served_files:
                        files[file] = (item.get("ETag", ""), int(item.get("Size", 0)))
        except ClientError as exc:
            raise OSError(f"{self.describe()} cannot be listed: {_client_error(exc)}") from None
        except BotoCoreError as exc:
            raise OSError(f"{self.describe()} cannot be listed: {exc}") from None
        return found

    def names(self) -> list[str]:
        return sorted(self._listing())

    def signatures(self) -> dict[str, Signature | None]:
        return {name: _signature(files) for name, files in self._listing().items() if is_safe_name(name)}

    def _files(self, name: str) -> Files | None:
        if not is_safe_name(name):
            return None
        return self._listing(f"{name}/").get(name)

    def has(self, name: str) -> bool:
        try:
            return bool(self._files(name))
        except OSError as exc:
            log.warning("%s", exc)
            return False

    def signature(self, name: str) -> Signature | None:
        try:
            files = self._files(name)
        except OSError:
            return None
        return _signature(files) if files else None

    # --- fetching ----------------------------------------------------------------------
    def fetch(self, name: str, snapshots: SnapshotStore | None, file_limits: dict[str, int]) -> Path:
        try:
            files = self._files(name)
        except OSError as exc:
            raise AdapterInvalid(name, str(exc)) from None
        if not files:
            raise AdapterInvalid(name, f"no {CONFIG_FILE} or weights under {self.location(name)}/")
        for file, (_, size) in files.items():
            if file in file_limits and size > file_limits[file]:
                raise AdapterInvalid(name, f"{file} is larger than the limit of {file_limits[file]} bytes ({size} listed)")
        deadline = Deadline(self.timeout_s, name)

        def download(staging: Path) -> None:
            for file, (etag, _) in sorted(files.items()):
                if file in file_limits:
                    with_retries(lambda: self._download(name, file, etag, staging, file_limits[file], deadline),
                                 deadline, f"reading {file}")
            try:
                now = self._files(name)
            except OSError as exc:
                raise AdapterInvalid(name, str(exc)) from None
            if now != files:
                raise AdapterInvalid(name, "it changed during the fetch (listed again after it); fetched again on its next use")

        return fetch_into(snapshots, cache_key(self.describe(), name, _signature(files)), file_limits, name, download)

    def _download(self, name: str, file: str, etag: str, staging: Path, most: int, deadline: Deadline) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = f"{self._base()}{name}/{file}"
        try:
            answer = self.client().get_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            body = answer["Body"]
            try:
                receive_file(staging, file, deadline.bounded(body.iter_chunks(CHUNK)), most)
            finally:
                body.close()
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 412 or _code(exc) in ("PreconditionFailed", "NoSuchKey"):
                raise AdapterInvalid(name, f"{file} changed during the fetch; fetched again on its next use") from None
            if status >= 500:
                raise Retryable(_client_error(exc)) from None
            raise AdapterInvalid(name, f"{file} cannot be read: {_client_error(exc)}") from None
        except (BotoCoreError, OSError) as exc:  # a dropped connection, a timeout, a short body
            raise Retryable(f"{type(exc).__name__}: {exc}") from None


    # --- publishing (fine-tuning jobs on Ray Serve: finetuning/publishing.py) -------------
    def publish(self, name: str, folder: Path) -> None:
        """Upload an adapter folder's served files as `<prefix>/<name>/`, the weights last
        (a reader listing meanwhile sees no weights, so no adapter yet)."""
        if not is_safe_name(name):
            raise ValueError(f"{name!r} is not a safe adapter name")
        files = sorted((p for p in Path(folder).iterdir() if p.is_file() and p.name in self.served_files),
                       key=lambda p: p.suffix == ".safetensors")
        for path in files:
            self.client().upload_file(str(path), self.bucket, f"{self._base()}{name}/{path.name}")

    def withdraw(self, name: str) -> None:
        """Delete an adapter's files (one that a cancelled job had published)."""
        if is_safe_name(name):
            for file in self.served_files:
                self.client().delete_object(Bucket=self.bucket, Key=f"{self._base()}{name}/{file}")


def _signature(files: Files) -> Signature:
    return tuple(sorted((file, etag, size) for file, (etag, size) in files.items()))


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client_error(exc) -> str:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    return f"{_code(exc) or 'error'} (HTTP {status})"
