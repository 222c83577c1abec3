"""The keys file and the per-key limits, without a server."""

from __future__ import annotations

import os

import pytest

from adapterserve.tenants.keys import KeyEntry, KeyLimits, KeyStore, add, hash_secret, read, revoke
from adapterserve.api.errors import as_api_error
from adapterserve.tenants.limits import RateLimitExceeded, TenantLimiter


def test_secrets_are_stored_only_hashed_and_found_by_the_store(tmp_path):
    path = tmp_path / "keys.yaml"
    entry, secret = add(path, "team-a", ["pirate", "team-a-*"], False, ["inference"], KeyLimits(requests_per_minute=5))
    text = path.read_text()
    assert secret not in text and hash_secret(secret) in text
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    store = KeyStore(path)
    assert store.lookup(secret).id == entry.id
    assert store.lookup(secret + "x") is None and store.lookup(None) is None


def test_models_by_name_and_glob_and_the_base():
    key = KeyEntry(id="k", tenant="t", sha256="0" * 64, models=["pirate", "team-a-*"], base=False)
    assert key.may_use("pirate", "base") and key.may_use("team-a-summaries", "base")
    assert not key.may_use("base", "base") and not key.may_use("team-b-x", "base") and not key.may_use("Pirate", "base")


def test_the_store_follows_the_file_and_keeps_the_last_good_keys(tmp_path):
    path = tmp_path / "keys.yaml"
    first, secret = add(path, "a", ["x"], True, ["inference"], KeyLimits())
    store = KeyStore(path)
    _, second = add(path, "b", ["y"], True, ["inference"], KeyLimits())
    assert store.lookup(second) is not None  # added while running
    revoke(path, key_id=first.id)
    assert store.lookup(secret) is None  # revoked: refused on the next lookup
    path.write_text("keys: [{id: broken}]")  # an edit that breaks the file
    assert store.lookup(second) is not None  # the last good keys stay in effect
    with pytest.raises(ValueError):
        read(path)


def test_requests_per_minute_with_retry_after():
    now = [0.0]
    limiter = TenantLimiter(clock=lambda: now[0])
    key = KeyEntry(id="k", tenant="t", sha256="0" * 64, limits=KeyLimits(requests_per_minute=2))
    limiter.admit(key)
    now[0] = 10.0
    limiter.admit(key)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.admit(key)
    rendered = as_api_error(refused.value)  # the API's one table of statuses
    assert rendered.status == 429 and rendered.headers["Retry-After"] == "50"
    assert refused.value.reason == "requests_per_minute"
    now[0] = 60.5  # the first left the window
    limiter.admit(key)


def test_tokens_per_minute_and_concurrency():
    now = [0.0]
    limiter = TenantLimiter(clock=lambda: now[0])
    key = KeyEntry(id="k", tenant="t", sha256="0" * 64, limits=KeyLimits(tokens_per_minute=100, concurrent_requests=1))
    limiter.admit(key)
    with pytest.raises(RateLimitExceeded) as busy:
        limiter.admit(key)
    assert busy.value.reason == "concurrent_requests"
    limiter.release(key)
    limiter.record_tokens("k", 120)
    with pytest.raises(RateLimitExceeded) as spent:
        limiter.admit(key)
    assert spent.value.reason == "tokens_per_minute"
    other = KeyEntry(id="other", tenant="u", sha256="1" * 64, limits=KeyLimits(tokens_per_minute=100))
    limiter.admit(other)  # another key is not affected
    now[0] = 61.0
    limiter.admit(key)


def _add_keys(path, tenant, count):
    for _ in range(count):
        add(path, tenant, ["x"], True, ["inference"], KeyLimits())


def test_keys_added_and_revoked_at_the_same_time_are_all_kept(tmp_path):
    import multiprocessing

    path = tmp_path / "keys.yaml"
    doomed, _ = add(path, "doomed", ["x"], True, ["inference"], KeyLimits())
    context = multiprocessing.get_context("fork")  # four writers at once, as four shells would be
    writers = [context.Process(target=_add_keys, args=(path, f"t{i}", 15)) for i in range(4)]
    for writer in writers:
        writer.start()
    revoke(path, key_id=doomed.id)  # meanwhile
    for writer in writers:
        writer.join(60)
    keys = read(path).keys
    assert sorted(k.tenant for k in keys) == sorted(f"t{i}" for i in range(4) for _ in range(15))  # none lost, none back
