"""The routing series' parts without an engine: worker counts turned into increments, and
vLLM's unbounded lora gauge left out of the page."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from adapterserve.engine_plugins.lora_events import LOAD_BUCKETS, LoraCounts
from adapterserve.metrics.lora_routing import LORA_INFO, WithoutVllmLoraInfo, WorkerLoadCounts


def test_loads_are_bucketed_by_time():
    counts = LoraCounts()
    durations = (0.001, 0.02, 0.02, 100.0)  # given, not timed: where each lands is the point
    for seconds in durations:
        counts.observe_load(seconds)
    report = counts.as_report()
    assert report["loads"] == 4 and report["load_seconds_sum"] == pytest.approx(sum(durations))
    assert report["load_buckets"][0] == 1  # <= 5 ms
    assert report["load_buckets"][LOAD_BUCKETS.index(0.025)] == 2
    assert report["load_buckets"][-1] == 1  # +Inf


def test_worker_counts_become_increments_and_restart_from_zero_with_a_new_engine():
    counts = WorkerLoadCounts()
    first = LoraCounts()
    first.observe_load(0.01)
    first.evictions = 0
    assert counts.increments("generate", 1, first.as_report()) == (1, 0)
    first.observe_load(0.01)
    first.evictions = 3
    assert counts.increments("generate", 1, first.as_report()) == (1, 3)
    assert counts.increments("generate", 1, first.as_report()) == (0, 0)  # nothing new
    restarted = LoraCounts()
    restarted.observe_load(0.2)
    assert counts.increments("generate", 2, restarted.as_report()) == (1, 0)  # a new client: from zero
    assert sum(counts.load_buckets) == 3


def test_vllm_own_lora_gauge_is_left_out():
    registry = CollectorRegistry()
    gauge = Gauge(LORA_INFO, "vLLM's", ["running_lora_adapters"], registry=registry)
    for combination in ("a", "a,b", "b"):
        gauge.labels(combination).set(1)
    Gauge("vllm:other", "kept", registry=registry).set(2)
    page = generate_latest(WithoutVllmLoraInfo(registry)).decode()
    assert LORA_INFO not in page and "vllm:other 2.0" in page
