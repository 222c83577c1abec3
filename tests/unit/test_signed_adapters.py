"""Signed adapters (registry/signing.py) with the real model-signing package and real
elliptic-curve keys: a folder signed by a trusted key is served, from a local store or
from S3; unsigned, tampered, signed-by-another and extra-file folders are refused with
the reason; `adapters sign` writes the signature."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterserve.registry.limits import SIGNATURE_FILE
from adapterserve.registry.records import AdapterInvalid
from adapterserve.registry.signing import sign_folder, verify_folder
from adapterserve.registry.snapshots import SnapshotStore
from adapterserve.registry.sources import local_stores
from adapterserve.registry.store import Registry
from adapterserve.registry.validation import Limits
from tests.adapter_factory import signing_key_pair as key_pair, write_lora


@pytest.fixture
def keys(tmp_path):
    return {"trusted": key_pair(tmp_path, "trusted"), "other": key_pair(tmp_path, "other")}


@pytest.fixture
def signed_store(tmp_path, tiny_base, keys) -> Path:
    store = tmp_path / "signed-store"
    signed = write_lora(store / "signed", tiny_base, rank=4, seed=1)
    (signed / "README.md").write_text("trained on ...")  # not an adapter file: left out of the signature
    sign_folder(signed, keys["trusted"][0])
    write_lora(store / "unsigned", tiny_base, rank=4, seed=2)
    shutil.copytree(signed, store / "tampered")
    write_lora(store / "tampered", tiny_base, rank=4, seed=3)  # new weights under the old signature
    sign_folder(write_lora(store / "by-another", tiny_base, rank=4, seed=4), keys["other"][0])
    shutil.copytree(signed, store / "extra-file")
    (store / "extra-file" / "labels.json").write_text('{"labels": ["a"]}')  # an adapter file nobody signed
    return store


def test_only_adapters_signed_by_a_trusted_key_are_served_each_refusal_with_its_reason(signed_store, tiny_base, keys, tmp_path):
    registry = Registry(
        base=tiny_base, sources=local_stores([signed_store]), snapshots=SnapshotStore(tmp_path / "snapshots"),
        limits=Limits(max_lora_rank=16, require_signed=True, trusted_keys=(str(keys["trusted"][1]),)),
    )
    registry.scan()
    assert list(registry.adapters) == ["signed"]
    assert (registry.adapters["signed"].path / SIGNATURE_FILE).is_file()
    reasons = {p.name: p.reason for p in registry.problems}
    assert "not signed (no model.sig)" in reasons["unsigned"]
    assert "do not match what was signed" in reasons["tampered"] and "adapter_model.safetensors" in reasons["tampered"]
    assert "not signed by a trusted key" in reasons["by-another"]
    assert "do not match what was signed" in reasons["extra-file"] and "labels.json" in reasons["extra-file"]


def test_without_the_requirement_signatures_are_not_checked(signed_store, tiny_base, tmp_path):
    registry = Registry(base=tiny_base, sources=local_stores([signed_store]), limits=Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(tmp_path / "snapshots"))
    registry.scan()
    assert sorted(registry.adapters) == ["by-another", "extra-file", "signed", "tampered", "unsigned"]


def test_any_of_several_trusted_keys_verifies_and_the_folder_is_checked_in_place_for_reports(signed_store, keys):
    trusted = (str(keys["other"][1]), str(keys["trusted"][1]))
    verify_folder(signed_store / "signed", trusted, "signed")  # README.md beside it: only the adapter files count
    with pytest.raises(AdapterInvalid, match="no trusted key"):
        verify_folder(signed_store / "signed", (), "signed")


def test_a_damaged_signature_file_is_a_refusal_not_a_crash(signed_store, keys):
    (signed_store / "signed" / SIGNATURE_FILE).write_text('{"not": "a bundle"')
    with pytest.raises(AdapterInvalid, match="signature"):
        verify_folder(signed_store / "signed", (str(keys["trusted"][1]),), "signed")


def test_adapters_sign_writes_a_signature_the_server_verifies(tmp_path, tiny_base, keys):
    from adapterserve.cli import app

    folder = write_lora(tmp_path / "to-sign", tiny_base, rank=4)
    result = CliRunner().invoke(app, ["adapters", "sign", str(folder), "--key", str(keys["trusted"][0])])
    assert result.exit_code == 0, result.output
    verify_folder(folder, (str(keys["trusted"][1]),), "to-sign")
    refused = CliRunner().invoke(app, ["adapters", "sign", str(tmp_path), "--key", str(keys["trusted"][0])])
    assert refused.exit_code == 1 and "adapter_config.json" in refused.output


def test_requiring_signatures_needs_trusted_keys_that_exist(tmp_path):
    from pydantic import ValidationError

    from adapterserve.config import Settings
    from adapterserve.registry.store import limits_from

    with pytest.raises(ValidationError, match="needs trusted_adapter_keys"):
        Settings(require_signed_adapters=True)
    with pytest.raises(ValidationError, match="an adapter source is"):
        Settings(adapter_sources=["ftp://host/adapters"])
    settings = Settings(require_signed_adapters=True, trusted_adapter_keys=[tmp_path / "absent.pub.pem"])
    with pytest.raises(ValueError, match="trusted adapter keys not found"):
        limits_from(settings)


def test_a_fine_tuned_adapter_is_signed_before_it_goes_in_where_only_signed_adapters_serve(tiny_base, keys, tmp_path):
    """The fine-tuning publisher (shared mode) signs what a job trained with the server's
    `fine_tuning_signing_key`, so a server that requires signatures serves it; without a
    key the same folder is refused as unsigned and removed again."""
    import asyncio

    from adapterserve.finetuning.publishing import AdapterPublisher

    store = tmp_path / "fine-tuned"
    store.mkdir()
    registry = Registry(base=tiny_base, sources=local_stores([store]), snapshots=SnapshotStore(tmp_path / "snapshots"),
                        limits=Limits(max_lora_rank=16, require_signed=True, trusted_keys=(str(keys["trusted"][1]),)))

    class Host:  # the shared host's load, as far as signatures go: the registry's validation of the store's folder
        async def load_adapter(self, name):
            registry.register(registry.validate(name))

    trained = write_lora(tmp_path / "job-1" / "adapter", tiny_base, rank=4, seed=5)
    (trained.parent / "adapter" / "training_log.txt").write_text("step 1 ...")  # not an adapter file
    asyncio.run(AdapterPublisher(Host(), store, keys["trusted"][0]).publish("ft-signed", trained))
    assert "ft-signed" in registry.adapters and (store / "ft-signed" / SIGNATURE_FILE).is_file()
    unsigned = write_lora(tmp_path / "job-2" / "adapter", tiny_base, rank=4, seed=6)
    with pytest.raises(AdapterInvalid, match="not signed"):
        asyncio.run(AdapterPublisher(Host(), store).publish("ft-unsigned", unsigned))
    assert not (store / "ft-unsigned").exists() and "ft-unsigned" not in registry.adapters
