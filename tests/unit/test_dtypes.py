"""`dtype auto` on a CPU: bf16 only where it is native and measured faster, the measurement
kept once per CPU so that every process (server, engines, tests) serves and expects the
same dtype."""

from __future__ import annotations

import json

import pytest

from adapterserve import dtypes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dtypes.measured_cpu_dtype.cache_clear()
    yield tmp_path / "adapterserve"
    dtypes.measured_cpu_dtype.cache_clear()


def test_an_explicit_dtype_is_served_as_given():
    assert dtypes.resolve_dtype("bfloat16") == "bfloat16"
    assert dtypes.resolve_dtype("float32") == "float32"


def test_without_native_bf16_auto_is_float32_without_measuring(monkeypatch, cache):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(dtypes, "probe_cpu_dtypes", lambda: pytest.fail("no probe without native bf16"))
    assert dtypes.resolve_dtype("auto") == "float32"


@pytest.mark.parametrize("float32_ms, bfloat16_ms, expected", [(10.0, 15.0, "float32"), (10.0, 9.5, "float32"), (10.0, 5.0, "bfloat16")])
def test_bf16_is_chosen_only_when_clearly_faster(monkeypatch, cache, float32_ms, bfloat16_ms, expected):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(dtypes, "_probe_ms", lambda dtype, rows: {"torch.float32": float32_ms, "torch.bfloat16": bfloat16_ms}[str(dtype)] / 2)
    assert dtypes.resolve_dtype("auto") == expected


def test_the_first_measurement_is_kept_for_every_later_process(monkeypatch, cache):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    calls = []

    def probe():
        calls.append(1)
        return {"dtype": "bfloat16", "ms": {"float32": 10, "bfloat16": 5}}

    monkeypatch.setattr(dtypes, "probe_cpu_dtypes", probe)
    assert dtypes.resolve_dtype("auto") == "bfloat16"
    (kept,) = cache.glob("dtype-probe-*.json")
    assert json.loads(kept.read_text())["dtype"] == "bfloat16"
    dtypes.measured_cpu_dtype.cache_clear()  # another process
    kept.write_text(json.dumps({"dtype": "float32"}))  # what the first process decided
    assert dtypes.resolve_dtype("auto") == "float32" and len(calls) == 1
