"""Validation refuses each kind of broken adapter with its reason and keeps the good ones."""

from __future__ import annotations

import os
import time

import pytest

from adapterserve.registry.store import Registry
from adapterserve.registry.sources import local_stores
from adapterserve.registry.validation import Limits
from tests.adapter_factory import build_broken_corpus, write_lora


def test_each_broken_adapter_is_refused_with_its_reason(tmp_path, tiny_base):
    store, outside = tmp_path / "store", tmp_path / "outside"
    expected = build_broken_corpus(store, tiny_base, outside, max_rank=16)
    write_lora(store / "good", tiny_base, rank=4)
    registry = Registry(base=tiny_base, sources=local_stores([store]), limits=Limits(max_lora_rank=16, refuse_other_base=True))
    registry.scan()
    assert set(registry.adapters) == {"good"}
    reasons = {p.name: p.reason for p in registry.problems}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])


def test_other_base_is_a_warning_unless_refused(tmp_path, tiny_base):
    store = tmp_path / "store"
    write_lora(store / "foreign", tiny_base, rank=4, config_overrides={"base_model_name_or_path": "org/other-model"})
    registry = Registry(base=tiny_base, sources=local_stores([store]), limits=Limits(max_lora_rank=16))
    registry.scan()
    assert registry.adapters["foreign"].warnings == ["trained for base 'org/other-model', served base is 'tiny-base'"]


def test_record_fields(tmp_path, tiny_base):
    store = tmp_path / "store"
    write_lora(store / "small", tiny_base, rank=4, targets=("q_proj", "down_proj"))
    registry = Registry(base=tiny_base, sources=local_stores([store]), limits=Limits())
    registry.scan()
    record = registry.adapters["small"]
    assert record.kind == "lora" and record.rank == 4
    assert record.target_modules == ["q_proj", "down_proj"]
    # q_proj: A 4x16 + B 16x4; down_proj: A 4x32 + B 16x4; two layers
    assert record.trainable_params == 2 * (4 * 16 + 16 * 4 + 4 * 32 + 16 * 4)
    assert record.size_bytes == sum(p.stat().st_size for p in (store / "small").iterdir())


def test_duplicate_names_across_stores_keep_the_first(tmp_path, tiny_base):
    first, second = tmp_path / "a", tmp_path / "b"
    write_lora(first / "same", tiny_base, rank=4)
    write_lora(second / "same", tiny_base, rank=4)
    registry = Registry(base=tiny_base, sources=local_stores([first, second]), limits=Limits())
    registry.scan()
    assert registry.adapters["same"].path == (first / "same").resolve()
    assert "duplicate name" in registry.problems[0].reason


def test_a_refusal_naming_a_hostile_tensor_is_one_log_line(tmp_path, tiny_base, caplog):
    import logging

    import torch
    from safetensors.torch import load_file, save_file

    from adapterserve.registry.store import Registry
    from adapterserve.registry.sources import local_stores
    from adapterserve.registry.validation import Limits
    from tests.adapter_factory import write_lora

    folder = tmp_path / "store" / "forger"
    write_lora(folder, tiny_base, rank=4)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["x\nERROR adapterserve: all adapters deleted\r.lora_A.weight"] = torch.zeros(4, 16)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    registry = Registry(base=tiny_base, sources=local_stores([tmp_path / "store"]), limits=Limits(max_lora_rank=16))
    with caplog.at_level(logging.WARNING, logger="adapterserve.registry.store"):
        registry.scan()
    assert "forger" not in registry.adapters
    (line,) = [r.getMessage() for r in caplog.records if "forger" in r.getMessage()]
    assert "\n" not in line and "\r" not in line and "\\n" in line, line


def _version(folder, tiny_base, seed):
    from tests.adapter_factory import write_lora

    write_lora(folder, tiny_base, rank=4, seed=seed)


def test_snapshots_no_version_uses_are_collected(tmp_path, tiny_base):
    from adapterserve.registry.snapshots import SnapshotStore
    from adapterserve.registry.validation import validate_adapter

    store, snapshots = tmp_path / "store", SnapshotStore(tmp_path / "snapshots")
    paths = []
    for seed in range(5):  # a folder rewritten before each scan
        _version(store / "churn", tiny_base, seed)
        paths.append(validate_adapter(store / "churn", store, tiny_base, Limits(max_lora_rank=16), snapshots).path)
    assert len(set(paths)) == 5
    assert snapshots.collect({paths[-1]}, grace_s=3600) == []  # all within their grace
    for path in paths:  # an hour later
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    SnapshotStore(tmp_path / "snapshots").touch({paths[1]})  # another server sharing the cache uses this one
    assert sorted(snapshots.collect({paths[-1]}, grace_s=600)) == sorted(p.name for p in (paths[0], paths[2], paths[3]))
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == sorted([paths[1].name, paths[-1].name])


def test_a_damaged_snapshot_is_not_reused(tmp_path, tiny_base):
    from adapterserve.registry.snapshots import SnapshotStore
    from adapterserve.registry.validation import validate_adapter

    store, snapshots = tmp_path / "store", SnapshotStore(tmp_path / "snapshots")
    _version(store / "a", tiny_base, 1)
    first = validate_adapter(store / "a", store, tiny_base, Limits(max_lora_rank=16), snapshots).path
    weights = first / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # changed under its address
    again = validate_adapter(store / "a", store, tiny_base, Limits(max_lora_rank=16), snapshots).path
    assert again == first and weights.read_bytes() == (store / "a" / "adapter_model.safetensors").read_bytes()


def test_a_link_swapped_in_after_the_check_reads_nothing_outside(tmp_path, tiny_base):
    from adapterserve.registry.snapshots import SnapshotError, SnapshotStore

    store, outside = tmp_path / "store", tmp_path / "secret.json"
    _version(store / "a", tiny_base, 1)
    outside.write_text('{"peft_type": "LORA", "secret": 1}')
    config = store / "a" / "adapter_config.json"
    config.unlink()
    config.symlink_to(outside)  # what a neighbour does between validation and copy
    with pytest.raises(SnapshotError, match="outside the adapter store"):
        SnapshotStore(tmp_path / "snapshots").stage(store / "a", {"adapter_config.json": 10_000}, inside=store)


def test_the_modules_an_adapter_trains_are_read_from_its_tensors_and_outside_the_slots_refused(tmp_path, tiny_base):
    """`lora_target_modules` auto: the engines' slots hold the modules the stores' adapters
    train; one training another module is refused with the reason and the way out."""
    from adapterserve.config import Settings, fitted_lora_modules

    store = tmp_path / "store"
    write_lora(store / "qv", tiny_base, rank=4)
    write_lora(store / "pattern", tiny_base, rank=4, targets=("q_proj", "down_proj"),
               config_overrides={"target_modules": ".*(q_proj|down_proj)"})  # a peft pattern: read from the tensors
    registry = Registry(base=tiny_base, sources=local_stores([store]), limits=Limits(max_lora_rank=16))
    registry.scan()
    assert registry.adapters["qv"].lora_modules == ["q_proj", "v_proj"]
    assert registry.adapters["pattern"].lora_modules == ["down_proj", "q_proj"]

    assert Settings().fixed_lora_modules is None  # every module, unless asked
    auto = Settings(lora_target_modules="auto").fixed_lora_modules
    assert fitted_lora_modules(auto, registry.adapters.values()) == {"q_proj", "v_proj", "down_proj"}
    assert fitted_lora_modules(auto, []) is None  # no adapter yet: every module
    assert fitted_lora_modules(Settings(lora_target_modules="all").fixed_lora_modules, registry.adapters.values()) is None
    assert fitted_lora_modules(Settings(lora_target_modules="q_proj,o_proj").fixed_lora_modules, []) == {"q_proj", "o_proj"}

    write_lora(store / "wide", tiny_base, rank=4, targets=("q_proj", "o_proj", "up_proj"))
    narrow = Registry(base=tiny_base, sources=local_stores([store]),
                      limits=Limits(max_lora_rank=16, lora_modules=frozenset({"q_proj", "v_proj", "down_proj"})))
    narrow.scan()
    assert set(narrow.adapters) == {"qv", "pattern"}
    reason = next(p.reason for p in narrow.problems if p.name == "wide")
    assert "it trains o_proj, up_proj, which the engines' LoRA slots do not hold" in reason
    assert "--lora-target-modules all" in reason
