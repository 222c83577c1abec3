"""The CPU LoRA kernel is built once per source, compiler and CPU, and where it cannot be
built the fused path says so and serves with its PyTorch forms."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adapterserve.dtypes import cpu_identity
from adapterserve.engine_plugins.cpu_lora import native


def test_the_kernel_is_built_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = native.built_kernel_path()
    assert built.parent == tmp_path / "adapterserve" / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert native.built_kernel_path() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no scratch left behind


def assert_unavailable(load, warning: str, caplog) -> None:
    """`load` (a cached loader of native.py), called afresh, gives None and logs `warning`."""
    load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=native.log.name):
            assert load() is None
        assert warning in caplog.text
    finally:
        load.cache_clear()


def test_a_compiler_that_fails_leaves_the_pytorch_forms(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", ("-O3", "--no-such-flag"))
    with pytest.raises(RuntimeError, match="failed"):
        native.built_kernel_path()
    assert_unavailable(native.load_kernel, "not available, the PyTorch forms serve", caplog)


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.load_kernel.cache_clear()
    try:
        assert native.load_kernel() is None
    finally:
        native.load_kernel.cache_clear()


@pytest.mark.parametrize("march", ["haswell", "native"])
def test_each_build_gives_the_float64_sums(tmp_path, monkeypatch, march):
    """CI runs on AVX2-only CPUs too: the kernel built for AVX2 (`-march=haswell`, which
    this machine can run) equals the float64 reference, as the native build does (on a CPU
    with AVX512-BF16 that build has a bf16 form of its own: `vdpbf16ps`, units of 4
    tokens). Sizes off the 16- and 32-lane blocks, and slots with 5, 4 and 3 tokens, so
    that every unit size (4, 2, 1) and every tail runs."""
    import ctypes

    import torch

    if march == "haswell" and "avx2" not in cpu_identity().split("|")[1].split():
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in native.FLAGS))
    kernel = native.LoraKernel(ctypes.CDLL(str(native.built_kernel_path())))
    flags = cpu_identity().split("|")[1].split()
    assert kernel.bf16_form == (march == "native" and {"avx512_bf16", "avx512bw"} <= set(flags))
    generator = torch.Generator().manual_seed(5)
    rank, k, sizes = 8, 100, (70, 33)  # off the 16- and 32-lane blocks: the tails too
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(3 * 2 * rank, k, generator=generator).to(dtype)
        bs = [torch.randn(3 * rank, n, generator=generator).to(dtype) for n in sizes]
        slot_of = torch.tensor([0, 2, -1, 1, 2, 0, 0, 1, 0, 2, 0, 1, 1])  # slots 0, 1, 2: 5, 4, 3 tokens
        tokens = slot_of.shape[0]
        x, start = torch.randn(tokens, k, generator=generator).to(dtype), torch.randn(tokens, sum(sizes), generator=generator).to(dtype)
        got = start.clone()
        kernel.apply(got, x, a, 2 * rank, slot_of, native.int64_array(sizes), native.pointer_array(bs), rank, 0b11, 0.5)
        expected = start.double().clone()
        for t, slot in enumerate(slot_of.tolist()):
            if slot < 0:
                continue
            h = x[t].double() @ a[slot * 2 * rank : (slot + 1) * 2 * rank].double().T
            expected[t, :70] += 0.5 * h[:rank] @ bs[0][slot * rank : (slot + 1) * rank].double()
            expected[t, 70:] += 0.5 * h[rank:] @ bs[1][slot * rank : (slot + 1) * rank].double()
        tolerance = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
        torch.testing.assert_close(got.double(), expected, **tolerance)
        assert torch.equal(got[2], start[2])  # the token without adapter


def test_threads_split_the_tokens_without_changing_a_bit():
    """The kernel splits a layer's tokens over PyTorch's OpenMP threads (the one runtime
    in the process): every token gets the bits one thread gives it, and the tokens
    without an adapter keep theirs."""
    import ctypes

    import torch

    runtimes = native.openmp_runtimes()
    library = ctypes.CDLL(str(native.built_kernel_path()))
    assert native.openmp_runtimes() == runtimes  # it runs on PyTorch's
    assert any(Path(r).parent == Path(torch.__file__).parent / "lib" for r in runtimes)
    one, team = native.LoraKernel(library, threads=1), native.LoraKernel(library, threads=2)
    generator = torch.Generator().manual_seed(11)
    rank, k, sizes, slots = 8, 576, (576, 192, 192), 5
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(slots * 3 * rank, k, generator=generator).to(dtype)
        bs = [torch.randn(slots * rank, n, generator=generator).to(dtype) for n in sizes]
        for tokens in (1, 2, 3, 16, 37, 200):
            slot_of = torch.randint(-1, slots, (tokens,), generator=generator)
            x = torch.randn(tokens, k, generator=generator).to(dtype)
            start = torch.randn(tokens, sum(sizes), generator=generator).to(dtype)
            got = {}
            for name, kernel in (("one", one), ("team", team)):
                y = start.clone()
                kernel.apply(y, x, a, 3 * rank, slot_of, native.int64_array(sizes), native.pointer_array(bs), rank, 0b111, 2.0)
                got[name] = y
            assert torch.equal(got["one"], got["team"]), (dtype, tokens)
            unused = slot_of < 0
            assert torch.equal(got["team"][unused], start[unused])
            assert not torch.equal(got["team"][~unused], start[~unused]) or not (~unused).any()


def test_the_unit_a_token_falls_in_changes_no_bit():
    """Tokens of one slot go through the kernel in units of 4, 2 or 1 (bf16 form: the units
    of 1 and 2 expand B row by row, those of 4 by blocks of columns): each token's output
    is the same bits whatever unit it was in, the expand's sums taken from zero in rank
    order. A bf16 output hides most orders of a float32 sum, so the first 3 columns of each
    slice are sums whose order shows: with every shrink sum 1 (x[0] = 1, A's only nonzero
    column), B's rows 0, 1, 2 add 2^24, 1 and -2^24, which is 0 in that order (2^24 + 1
    rounds to 2^24) and 1 in others. A token applied alone (a unit of 1) is compared with
    the same token among 4, 3 and 2 others of its slot; sizes off the 32-lane blocks and an
    odd rank run the tails and a group of fewer than 4 rows too."""
    import ctypes

    import torch

    kernel = native.LoraKernel(ctypes.CDLL(str(native.built_kernel_path())), threads=1)
    generator = torch.Generator().manual_seed(17)
    slots = 3
    for rank, k, sizes in ((8, 576, (576, 192, 192)), (5, 100, (70, 33, 1600))):
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.zeros(slots * 3 * rank, k, dtype=dtype)
            a[:, 0] = 1
            bs = [torch.randn(slots * rank, n, generator=generator).to(dtype) for n in sizes]
            for b in bs:
                b[:, :3] = 0
                for slot in range(slots):  # times the scale 0.5: 2^24, 1, -2^24
                    b[slot * rank : slot * rank + 3, :3] = torch.tensor([2.0**25, 2.0, -(2.0**25)]).to(dtype)[:, None]
            slot_of = torch.tensor([2, 0, 2, 2, 1, 2, 0, 1, 2, 0])  # slot 2: 5 tokens, slot 0: 3, slot 1: 2
            x = torch.randn(len(slot_of), k, generator=generator).to(dtype)
            x[:, 0] = 1
            start = torch.randn(len(slot_of), sum(sizes), generator=generator).to(dtype)
            together = start.clone()
            kernel.apply(together, x, a, 3 * rank, slot_of, native.int64_array(sizes), native.pointer_array(bs), rank, 0b111, 0.5)
            first_columns = [c for offset in (0, sizes[0], sizes[0] + sizes[1]) for c in range(offset, offset + 3)]
            assert torch.equal(together[:, first_columns], start[:, first_columns]), (rank, dtype)
            for t in range(len(slot_of)):
                alone = start.clone()
                only = torch.full_like(slot_of, -1)
                only[t] = slot_of[t]
                kernel.apply(alone, x, a, 3 * rank, only, native.int64_array(sizes), native.pointer_array(bs), rank, 0b111, 0.5)
                assert torch.equal(alone[t], together[t]), (rank, dtype, t)
                assert not torch.equal(alone[t], start[t])


def test_the_thread_count_comes_from_the_environment(monkeypatch):
    for value, expected in (("", 0), ("1", 1), ("3", 3), ("-2", 0), ("many", 0)):
        monkeypatch.setenv(native.ENV_THREADS, value)
        assert native.threads_from_env() == expected


def test_the_op_is_built_once_against_pytorch_and_a_failed_build_leaves_it_in_python(tmp_path, monkeypatch, caplog):
    """The compiled graph's C++ op (`lora_op.cpp`): built into the cache once; where it
    cannot be built, `load_op_state` says so and compiled.py registers the op in Python."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = native.built_op_path()
    assert built.name.startswith("lora_op-") and built.exists()
    stamp = built.stat().st_mtime_ns
    assert native.built_op_path() == built and built.stat().st_mtime_ns == stamp
    monkeypatch.setattr(native, "COMPILER", "/no/such/compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    assert_unavailable(native.load_op_state, "the compiled graph's op runs in Python", caplog)


def test_the_switches_keep_the_op_in_python(tmp_path):
    """`ADAPTERSERVE_LORA_OP=0` (or the kernel off): the op is registered in Python, under
    the same name, and applies the layer through the wrapper."""
    import os
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from adapterserve.engine_plugins.cpu_lora import compiled\n"
        "assert compiled.op_state() is None\n"
        "class Wrapper:\n"
        "    def add_lora_linear(self, y, x, a, b, scale, slices): y.add_(x)\n"
        "class Layer: punica_wrapper, lora_a_stacked, lora_b_stacked, output_slices = Wrapper(), (), (), (2,)\n"
        "layer = Layer(); compiled.register_layer(layer)\n"
        "y = torch.zeros(2, 2); compiled.registered_op()[0](y, torch.ones(2, 2), layer.adapterserve_layer_key)\n"
        "assert y.eq(1).all()\n"
    )
    for switch in (native.ENV_OP_SWITCH, native.ENV_SWITCH):
        env = {**os.environ, switch: "0", "XDG_CACHE_HOME": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not list((tmp_path / "adapterserve" / "kernels").glob("lora_op-*")), "built though switched off"
