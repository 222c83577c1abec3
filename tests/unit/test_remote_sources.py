"""Archive sources over HTTP (a real local HTTP server) and Hub sources from a local
Hugging Face cache read offline: served like any adapter, and the hostile cases refused:
a sha256 that does not match the pin, '..' and absolute members, links in an archive."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterserve.registry.snapshots import SnapshotStore
from adapterserve.registry.sources import open_source
from adapterserve.registry.store import Registry
from adapterserve.registry.validation import Limits
from tests.adapter_factory import write_lora


@pytest.fixture
def web(tmp_path):
    """A plain HTTP server over a folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def tar_of(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def adapter_files(tmp_path, base, seed=0) -> dict[str, bytes]:
    folder = write_lora(tmp_path / f"adapter-{seed}", base, rank=4, seed=seed)
    return {file.name: file.read_bytes() for file in folder.iterdir()}


def served(spec: str, base, tmp_path) -> Registry:
    registry = Registry(base=base, sources=[open_source(spec, timeout_s=20)], limits=Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(tmp_path / "snapshots"))
    registry.scan()
    return registry


def publish(root: Path, url: str, file: str, data: bytes, pin: str | None = None, name: str = "") -> str:
    (root / file).write_bytes(data)
    pin = pin or hashlib.sha256(data).hexdigest()
    return f"{url}/{file}#sha256={pin}" + (f"&name={name}" if name else "")


def test_a_pinned_tar_gz_under_one_folder_is_served_under_its_name(web, tmp_path, tiny_base):
    root, url = web
    files = adapter_files(tmp_path, tiny_base)
    archive = tar_of({f"summarize/{k}": v for k, v in files.items()} | {"summarize/README.md": b"notes"})
    registry = served(publish(root, url, "summarize.tar.gz", archive), tiny_base, tmp_path)
    record = registry.adapters["summarize"]
    assert not registry.problems and record.source == f"{url}/summarize.tar.gz"
    assert {p.name: p.read_bytes() for p in record.path.iterdir()} == files  # README.md left out


def test_a_zip_is_served_and_named_by_its_fragment(web, tmp_path, tiny_base):
    root, url = web
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file, data in adapter_files(tmp_path, tiny_base).items():
            archive.writestr(file, data)
    registry = served(publish(root, url, "v3.zip", buffer.getvalue(), name="legal-qa"), tiny_base, tmp_path)
    assert list(registry.adapters) == ["legal-qa"]


@pytest.mark.parametrize("case, expected", [
    ("other-bytes", "not the pinned"),
    ("dotdot", "unsafe path"),
    ("absolute", "unsafe path"),
    ("link", "not a regular file"),
    ("missing", "HTTP 404"),
    ("not-an-archive", "cannot be read"),
    ("twice", "adapter_config.json twice"),
])
def test_hostile_or_broken_archives_are_refused_with_the_reason(web, tmp_path, tiny_base, case, expected):
    root, url = web
    files = adapter_files(tmp_path, tiny_base)
    archives = {
        "other-bytes": (tar_of(files), hashlib.sha256(b"what was reviewed").hexdigest()),
        "dotdot": (tar_of(files | {"../adapter_config.json": b"{}"}), None),
        "absolute": (tar_of(files | {"/etc/adapter_config.json": b"{}"}), None),
        "link": (tar_of({"adapter_config.json": files["adapter_config.json"]}, {"adapter_model.safetensors": "/etc/passwd"}), None),
        "missing": (None, "0" * 64),
        "not-an-archive": (b"plain text, not gzip", None),
        "twice": (tar_of(files | {"other/adapter_config.json": b"{}"}), None),
    }
    data, pin = archives[case]
    if data is None:
        spec = f"{url}/missing.tar.gz#sha256={pin}"
    else:
        spec = publish(root, url, "adapter.tar.gz", data, pin)
    registry = served(spec, tiny_base, tmp_path)
    assert not registry.adapters
    assert expected in registry.problems[0].reason, registry.problems[0].reason
    assert [p for p in (tmp_path / "snapshots").iterdir() if p.name.startswith(".staging")] == []


@pytest.mark.parametrize("spec", ["https://host/a.tar.gz", "https://host/a.tar.gz#sha256=12ab", "https://host/a.rar#sha256=" + "0" * 64,
                                  "hf://just-a-name", "hf://org/../x", "ftp://host/a"])
def test_malformed_source_settings_are_refused_up_front(spec):
    with pytest.raises(ValueError):
        open_source(spec)


def test_a_hub_repo_is_served_from_the_local_cache_offline(tmp_path, tiny_base, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "a" * 40
    snapshot = cache / "models--acme--support-bot" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (cache / "models--acme--support-bot" / "refs").mkdir()
    (cache / "models--acme--support-bot" / "refs" / "main").write_text(commit)
    for file, data in adapter_files(tmp_path, tiny_base).items():
        (snapshot / file).write_bytes(data)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    registry = served("hf://acme/support-bot", tiny_base, tmp_path)
    record = registry.adapters["support-bot"]
    assert not registry.problems and record.source == "hf://acme/support-bot"
    assert registry.sources[0].signature("support-bot") == (commit,)
    assert registry.scanned == {"support-bot": (commit,)}  # what the first periodic scan compares with
    missing = served("hf://acme/not-cached", tiny_base, tmp_path)
    assert not missing.adapters and "not in the local Hugging Face cache" in missing.problems[0].reason


def test_an_adapter_unreadable_before_its_first_fetch_is_recorded_as_fetched(tmp_path, tiny_base):
    """The start's scan reads the signatures before it validates; a Hub repo not cached yet
    has none until its fetch. Recorded as None, the first periodic scan would take it for
    changed and load it again."""
    from adapterserve.registry.sources.local import LocalFolderSource

    class ReadableOnceFetched(LocalFolderSource):  # as a Hub repo: in the local cache once fetched
        fetched = False

        def signature(self, name):
            return super().signature(name) if self.fetched else None

        def signatures(self):
            return {name: self.signature(name) for name in super().signatures()}

        def fetch(self, name, snapshots, file_limits):
            self.fetched = True
            return super().fetch(name, snapshots, file_limits)

    write_lora(tmp_path / "store" / "support-bot", tiny_base, rank=4, seed=3)
    source = ReadableOnceFetched(tmp_path / "store")
    registry = Registry(base=tiny_base, sources=[source], limits=Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(tmp_path / "snapshots"))
    registry.scan()
    assert "support-bot" in registry.adapters
    assert registry.scanned == {"support-bot": source.signature("support-bot")} and registry.scanned["support-bot"]


def test_credentials_in_an_archive_url_are_never_shown(web, tmp_path, tiny_base):
    root, url = web
    spec = publish(root, url, "private.tar.gz", tar_of(adapter_files(tmp_path, tiny_base)))
    with_credentials = spec.replace("http://", "http://reader:hunter2@")
    registry = served(with_credentials, tiny_base, tmp_path)
    source = registry.sources[0]
    assert "private" in registry.adapters  # fetched with them
    shown = [source.describe(), source.location("private"), str(registry.adapters["private"].source)]
    assert not any("hunter2" in text or "reader" in text for text in shown), shown


MEMBER_NAMES = st.sampled_from([
    "adapter_config.json", "adapter_model.safetensors", "labels.json", "model.sig", "x/adapter_config.json",
    "x/y/adapter_model.safetensors", "../adapter_config.json", "/adapter_config.json", "./adapter_model.safetensors",
    "a/../../adapter_config.json", "README.md", "x", "", ".", "adapter_config.json/", "a\x00b",
]) | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
MEMBER_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(members=st.lists(st.tuples(MEMBER_NAMES, MEMBER_TYPES, st.binary(max_size=64)), max_size=6))
def test_fuzzed_archives_put_only_adapter_files_in_staging_or_are_refused(members, tmp_path_factory):
    """Whatever the members' names, types and bytes: a refusal (AdapterInvalid), or a staging
    folder holding only adapter file names, each within its limit; never a file elsewhere."""
    from adapterserve.registry.limits import SERVED_FILES
    from adapterserve.registry.records import AdapterInvalid
    from adapterserve.registry.snapshots import SnapshotError
    from adapterserve.registry.sources.archive import _extract

    work = tmp_path_factory.mktemp("fuzz")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "/etc/passwd"
                archive.addfile(info)
    (work / "archive").write_bytes(buffer.getvalue())
    staging = work / "staging"
    staging.mkdir()
    limits = dict.fromkeys(SERVED_FILES, 32)
    try:
        _extract(work / "archive", "tar", staging, limits, SERVED_FILES, "fuzzed")
    except (AdapterInvalid, SnapshotError):  # a file over its limit: fetch_into refuses the adapter for it
        pass
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
    assert all(p in ("archive", "staging") or (p.startswith("staging/") and p[8:] in SERVED_FILES) for p in written), written
    assert all((staging / f).stat().st_size <= 32 for f in SERVED_FILES if (staging / f).exists())
