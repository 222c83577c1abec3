"""Adapters in S3 (registry/sources/s3.py) against a real S3-compatible server (moto's
server mode on a free port, tests/s3_server.py), read through the standard AWS
environment as a team's bucket would be: the same validation and snapshots as a local
folder, the fetch cache, and the faults: a size over the limit, keys with '..', an object
changed during the fetch, a 403, the server stopped mid-fetch, and a 10,000-adapter prefix."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from adapterserve.registry.snapshots import SnapshotStore
from adapterserve.registry.sources import open_source, remote, s3 as s3_source
from adapterserve.registry.store import Registry
from adapterserve.registry.validation import Limits
from tests.adapter_factory import write_lora
from tests.s3_server import S3Server, serving, upload_folder

BUCKET = "team-adapters"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("moto"), BUCKET)


@pytest.fixture(autouse=True)
def aws_environment(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)


def counted(source) -> list[str]:
    """The keys `source` GETs from now on (botocore's own event hook)."""
    gets: list[str] = []
    source.client().meta.events.register("before-call.s3.GetObject", lambda params, **_: gets.append(params["url_path"]))
    return gets


def registry_over(spec: str, base, snapshots_dir, limits: Limits | None = None, validated_at_start=None) -> Registry:
    registry = Registry(base=base, sources=[open_source(spec)], limits=limits or Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(snapshots_dir), validated_at_start=validated_at_start)
    registry.scan()
    return registry


def test_an_adapter_in_s3_is_validated_and_served_from_the_snapshot_its_local_copy_has(s3, tiny_base, tmp_path):
    local = write_lora(tmp_path / "local" / "summarize", tiny_base, rank=4, seed=7)
    upload_folder(s3.client(), BUCKET, "same/summarize", local)
    from_s3 = registry_over(f"s3://{BUCKET}/same", tiny_base, tmp_path / "snapshots")
    from_disk = registry_over(str(tmp_path / "local"), tiny_base, tmp_path / "snapshots")
    record = from_s3.adapters["summarize"]
    assert record.path == from_disk.adapters["summarize"].path  # the same bytes, the same content address
    assert record.source == f"s3://{BUCKET}/same/summarize" and record.rank == 4 and not from_s3.problems
    assert sorted(p.name for p in record.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_fetched_version_is_copied_from_its_snapshot_not_fetched_again_until_it_changes(s3, tiny_base, tmp_path):
    folder = write_lora(tmp_path / "cached", tiny_base, rank=4, seed=1)
    upload_folder(s3.client(), BUCKET, "cache/cached", folder)
    first = registry_over(f"s3://{BUCKET}/cache", tiny_base, tmp_path / "snapshots")
    # another server (a restart, another replica) on the same machine: no object is read
    again = Registry(base=tiny_base, sources=[open_source(f"s3://{BUCKET}/cache")], limits=Limits(max_lora_rank=16),
                     snapshots=SnapshotStore(tmp_path / "snapshots"))
    gets = counted(again.sources[0])
    again.scan()
    assert gets == [] and again.adapters["cached"].path == first.adapters["cached"].path
    write_lora(folder, tiny_base, rank=4, seed=2)  # a new version: fetched
    upload_folder(s3.client(), BUCKET, "cache/cached", folder)
    changed = again.validate("cached")
    assert len(gets) == 2 and changed.path != first.adapters["cached"].path


def test_a_file_over_its_limit_is_refused_from_the_listing_before_a_byte_is_read(s3, tiny_base, tmp_path):
    upload_folder(s3.client(), BUCKET, "big/heavy", write_lora(tmp_path / "heavy", tiny_base, rank=8))
    registry = Registry(base=tiny_base, sources=[open_source(f"s3://{BUCKET}/big")],
                        limits=Limits(max_lora_rank=16, max_adapter_bytes=512), snapshots=SnapshotStore(tmp_path / "s"))
    gets = counted(registry.sources[0])
    registry.scan()
    assert not registry.adapters and gets == []
    assert "adapter_model.safetensors is larger than the limit of 512 bytes" in registry.problems[0].reason


def test_keys_with_dotdot_or_empty_segments_are_never_read_as_adapters_or_files(s3, tiny_base, tmp_path):
    client = s3.client()
    good = write_lora(tmp_path / "good", tiny_base, rank=4)
    upload_folder(client, BUCKET, "paths/good", good)
    config = (good / "adapter_config.json").read_bytes()
    for key in ("paths/../escaped/adapter_config.json", "paths//adapter_config.json",
                "paths/good/../../outside/adapter_model.safetensors", "paths/good/sub/adapter_model.safetensors"):
        client.put_object(Bucket=BUCKET, Key=key, Body=config)
    registry = registry_over(f"s3://{BUCKET}/paths", tiny_base, tmp_path / "snapshots")
    assert list(registry.adapters) == ["good"]
    files = sorted(p.name for p in registry.adapters["good"].path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    refused = {p.name: p.reason for p in registry.problems}
    assert set(refused) == {".."} and "not a safe model name" in refused[".."]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [".fetched", registry.adapters["good"].path.name]


def test_an_object_replaced_during_the_fetch_is_refused_never_mixed_and_served_once_stable(s3, tiny_base, tmp_path, monkeypatch):
    client = s3.client()
    folder = write_lora(tmp_path / "moving", tiny_base, rank=4, seed=3)
    upload_folder(client, BUCKET, "race/moving", folder)
    newer = write_lora(tmp_path / "newer", tiny_base, rank=4, seed=4)
    received = s3_source.receive_file

    def replaced_after_the_config(staging, file, chunks, most):
        received(staging, file, chunks, most)
        if file == "adapter_config.json":  # the weights are replaced between the two files
            client.put_object(Bucket=BUCKET, Key="race/moving/adapter_model.safetensors",
                              Body=(newer / "adapter_model.safetensors").read_bytes())

    monkeypatch.setattr(s3_source, "receive_file", replaced_after_the_config)
    registry = registry_over(f"s3://{BUCKET}/race", tiny_base, tmp_path / "snapshots")
    assert not registry.adapters and "changed during the fetch" in registry.problems[0].reason
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == []  # no staging or snapshot left
    monkeypatch.setattr(s3_source, "receive_file", received)
    record = registry.validate("moving")  # its next use fetches the version that stands now
    assert (record.path / "adapter_model.safetensors").read_bytes() == (newer / "adapter_model.safetensors").read_bytes()


def test_a_403_is_a_refusal_with_its_reason_and_without_the_credentials(tmp_path, tiny_base, monkeypatch):
    locked = S3Server(tmp_path / "moto-auth.log", require_auth=True).start()
    try:
        for key, value in locked.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-print-this-secret")
        registry = registry_over(f"s3://{BUCKET}/any", tiny_base, tmp_path / "snapshots")
        source = registry.sources[0]
        assert not registry.adapters and not source.has("anything")
        reason = registry.problems[0].reason
        assert "cannot be listed" in reason and "HTTP 403" in reason
        assert "do-not-print-this-secret" not in reason
    finally:
        locked.stop()


def test_the_s3_server_stopped_mid_fetch_is_a_refusal_after_retries_and_others_stay_served(tmp_path, tiny_base, monkeypatch):
    dying = S3Server(tmp_path / "moto-dying.log").start()
    try:
        for key, value in dying.env.items():
            monkeypatch.setenv(key, value)
        client = dying.client()
        client.create_bucket(Bucket=BUCKET)
        upload_folder(client, BUCKET, "gone/first", write_lora(tmp_path / "first", tiny_base, rank=4, seed=5))
        upload_folder(client, BUCKET, "gone/second", write_lora(tmp_path / "second", tiny_base, rank=4, seed=6))
        local = write_lora(tmp_path / "local" / "kept", tiny_base, rank=4)
        received = s3_source.receive_file

        def stop_the_server_after_a_config(staging, file, chunks, most):
            received(staging, file, chunks, most)
            if file == "adapter_config.json":
                dying.stop()

        monkeypatch.setattr(s3_source, "receive_file", stop_the_server_after_a_config)
        monkeypatch.setattr(remote, "FIRST_BACKOFF_S", 0.05)
        registry = Registry(base=tiny_base, sources=[open_source(str(local.parent)), open_source(f"s3://{BUCKET}/gone")],
                            limits=Limits(max_lora_rank=16), snapshots=SnapshotStore(tmp_path / "snapshots"))
        registry.scan()
    finally:
        dying.stop()
    assert list(registry.adapters) == ["kept"]
    reasons = {p.name: p.reason for p in registry.problems}
    assert "reading adapter_model.safetensors failed 3 times" in reasons["first"]
    assert "cannot be listed" in reasons["second"]  # the server is gone: refused, quickly, with why


@pytest.fixture(scope="module")
def ten_thousand(s3, tiny_base_module):
    """10,000 adapters in one prefix (a config each; the last three complete adapters)."""
    client = s3.client()
    client.create_bucket(Bucket="many-adapters")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="many-adapters", Key=f"all/task-{i:05d}/adapter_config.json", Body=b"{}"),
                      range(9997)))
    folder = write_lora(tiny_base_module.path.parent / "complete", tiny_base_module, rank=4)
    for name in ("zz-a", "zz-b", "zz-c"):
        upload_folder(client, "many-adapters", f"all/{name}", folder)
    return "s3://many-adapters/all"


@pytest.fixture(scope="module")
def tiny_base_module(tmp_path_factory):
    return _tiny(tmp_path_factory)


def _tiny(tmp_path_factory):
    import json

    import torch
    from safetensors.torch import save_file

    from adapterserve.registry.records import BaseModelInfo
    from tests.unit.conftest import HIDDEN

    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(50, HIDDEN)}
    for module, shape in {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (8, HIDDEN)}.items():
        tensors[f"model.layers.0.{module}.weight"] = torch.zeros(*shape)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "model_type": "llama"}))
    return BaseModelInfo.read("tiny-base", folder)


def test_a_10000_adapter_prefix_is_listed_in_pages_and_only_a_few_are_fetched_at_start(ten_thousand, tiny_base_module, tmp_path):
    registry = Registry(base=tiny_base_module, sources=[open_source(ten_thousand)], limits=Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(tmp_path / "snapshots"), validated_at_start=5)
    gets = counted(registry.sources[0])
    registry.scan()
    assert len(registry.problems) == 5 and not registry.adapters  # the first five: configs only, refused
    assert len(registry.listed) == 9995 and {"zz-a", "zz-b", "zz-c"} <= set(registry.listed)
    assert len(gets) == 5  # one config each; the 9,995 others are not read
    record = registry.validate("zz-b")  # its first request
    registry.register(record)
    assert "zz-b" not in registry.listed and registry.adapters["zz-b"].rank == 4


def test_a_published_adapter_is_listed_and_served_and_a_withdrawn_one_is_gone(s3, tiny_base, tmp_path):
    # what a fine-tuning job on Ray Serve does (finetuning/publishing.py:SourcePublisher)
    trained = write_lora(tmp_path / "trained", tiny_base, rank=4, seed=3)
    (trained / "README.md").write_text("not served")
    source = open_source(f"s3://{BUCKET}/published")
    source.publish("ft-mine-abc", trained)
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="published/").get("Contents", [])}
    assert keys == {"published/ft-mine-abc/adapter_config.json", "published/ft-mine-abc/adapter_model.safetensors"}
    assert registry_over(f"s3://{BUCKET}/published", tiny_base, tmp_path / "snapshots").adapters["ft-mine-abc"].rank == 4
    with pytest.raises(ValueError):
        source.publish("../escape", trained)
    source.withdraw("ft-mine-abc")
    assert s3.client().list_objects_v2(Bucket=BUCKET, Prefix="published/").get("KeyCount") == 0


def test_a_ray_tasks_trained_files_are_written_only_under_their_folder(tmp_path):
    from adapterserve.rayserve.fine_tuning import write_artifact

    write_artifact({"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"}, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("../escape", "/etc/passwd", "sub/file", ".."):
        with pytest.raises(ValueError):
            write_artifact({name: b"x"}, tmp_path / "other")
    assert not (tmp_path / "escape").exists()
