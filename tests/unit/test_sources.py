"""The adapter source seam (registry/sources/): what a source must do, shown with the local
store and with a source of another kind written here in a few lines (adapters kept in
memory, as an object store would hand them over): both feed the same validation, the
same snapshots and the same registry."""

from __future__ import annotations

import inspect
from pathlib import Path

from adapterserve.registry.records import AdapterInvalid
from adapterserve.registry.snapshots import SnapshotError, SnapshotStore
from adapterserve.registry.sources import AdapterSource, all_signatures, local_stores
from adapterserve.registry.sources.local import LocalFolderSource
from adapterserve.registry.store import Registry
from adapterserve.registry.validation import Limits
from tests.adapter_factory import write_lora


class MemorySource:
    """Adapters as name -> {file name: bytes}; fetched in chunks, as over a network."""

    def __init__(self, adapters: dict[str, dict[str, bytes]]):
        self.adapters = adapters

    def describe(self) -> str:
        return "memory://test"

    def names(self) -> list[str]:
        return sorted(self.adapters)

    def has(self, name: str) -> bool:
        return name in self.adapters

    def signature(self, name: str):
        files = self.adapters.get(name)
        return None if files is None else tuple(sorted((k, hash(v)) for k, v in files.items()))

    def signatures(self):
        return {name: self.signature(name) for name in self.adapters}

    def location(self, name: str) -> Path:
        return Path("/memory") / name

    def fetch(self, name, snapshots, file_limits):
        staging = snapshots.new_staging()
        try:
            for file, data in self.adapters[name].items():
                if file in file_limits:
                    SnapshotStore.receive(staging, file, (data[i:i + 4096] for i in range(0, len(data), 4096)), file_limits[file])
        except SnapshotError as exc:
            SnapshotStore.discard(staging)
            raise AdapterInvalid(name, str(exc)) from None
        return staging


def source_members() -> set[str]:
    return {name for name, _ in inspect.getmembers(AdapterSource) if not name.startswith("_")}


def test_both_sources_have_every_member_of_the_seam():
    for source in (LocalFolderSource, MemorySource):
        assert sorted(m for m in source_members() if not hasattr(source, m)) == [], source.__name__


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_registry_over_two_kinds_of_source_validates_and_snapshots_both(tmp_path, tiny_base):
    made = tmp_path / "made"
    good = files_of(write_lora(made / "remote-good", tiny_base, rank=4, seed=1))
    big = files_of(write_lora(made / "remote-big", tiny_base, rank=4, seed=2))
    memory = MemorySource({"remote-good": good, "remote-big": big, "shared": good})
    store = tmp_path / "store"
    write_lora(store / "local-one", tiny_base, rank=4, seed=3)
    write_lora(store / "shared", tiny_base, rank=4, seed=4)
    weights = len(big["adapter_model.safetensors"])
    limits = Limits(max_lora_rank=16, max_adapter_bytes=weights - 1)  # every adapter's weights are the same size
    registry = Registry(base=tiny_base, sources=[memory, *local_stores([store])], limits=limits,
                        snapshots=SnapshotStore(tmp_path / "snapshots"))
    registry.scan()
    # over the byte limit: refused while it arrives, with the reason, whatever its source
    assert registry.adapters == {}
    assert {p.name for p in registry.problems} == {"remote-good", "remote-big", "shared", "local-one"}
    assert all("larger than the limit" in p.reason for p in registry.problems)

    registry.limits = Limits(max_lora_rank=16)
    registry.scan()
    assert set(registry.adapters) == {"remote-good", "remote-big", "shared", "local-one"}
    for record in registry.adapters.values():  # served from server-owned snapshots
        assert record.path.parent == tmp_path / "snapshots"
    # the first source wins on a name; the other's is reported
    assert registry.adapters["shared"].source == Path("/memory/shared")
    assert [p.name for p in registry.problems] == ["shared"] and "duplicate name" in registry.problems[0].reason
    # the memory source's adapter has the same content as a local folder of the same bytes
    assert registry.adapters["remote-good"].path == registry.adapters["shared"].path


def test_signatures_change_with_the_adapter_and_the_first_source_wins(tmp_path, tiny_base):
    made = tmp_path / "made"
    one = files_of(write_lora(made / "a", tiny_base, rank=4, seed=1))
    two = files_of(write_lora(made / "b", tiny_base, rank=4, seed=2))
    memory = MemorySource({"a": one})
    store = tmp_path / "store"
    write_lora(store / "a", tiny_base, rank=4, seed=3)
    write_lora(store / "c", tiny_base, rank=4, seed=4)
    missing = LocalFolderSource(tmp_path / "not-there")  # cannot be listed: contributes nothing
    before = all_signatures([missing, memory, *local_stores([store])])
    assert set(before) == {"a", "c"} and before["a"] == memory.signature("a")
    memory.adapters["a"] = two
    assert all_signatures([memory])["a"] != before["a"]


def test_a_received_file_cannot_escape_or_exceed_its_staging_folder(tmp_path):
    snapshots = SnapshotStore(tmp_path / "snapshots")
    staging = snapshots.new_staging()
    for hostile in ("../escape", "a/b", "..", ""):
        try:
            SnapshotStore.receive(staging, hostile, [b"x"], 10)
        except SnapshotError:
            continue
        raise AssertionError(f"{hostile!r} was written")
    try:
        SnapshotStore.receive(staging, "adapter_config.json", [b"x" * 6, b"x" * 6], 10)
    except SnapshotError as exc:
        assert "larger than the limit of 10 bytes" in str(exc)
    else:
        raise AssertionError("a file over its limit was written whole")
    assert not (tmp_path / "escape").exists()
