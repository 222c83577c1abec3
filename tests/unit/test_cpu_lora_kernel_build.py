"""The CPU LoRA kernel is built once per source, compiler and CPU, and where it cannot be
built the fused path says so and serves with its PyTorch forms."""

from __future__ import annotations

import logging

import pytest

from adapterserve.engine_plugins.cpu_lora import native


def test_the_kernel_is_built_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = native.built_kernel_path()
    assert built.parent == tmp_path / "adapterserve" / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert native.built_kernel_path() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no scratch left behind


def test_a_compiler_that_fails_leaves_the_pytorch_forms(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", ("-O3", "--no-such-flag"))
    with pytest.raises(RuntimeError, match="failed"):
        native.built_kernel_path()
    native.load_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.log.name):
            assert native.load_kernel() is None
        assert "not available, the PyTorch forms serve" in caplog.text
    finally:
        native.load_kernel.cache_clear()


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.load_kernel.cache_clear()
    try:
        assert native.load_kernel() is None
    finally:
        native.load_kernel.cache_clear()
