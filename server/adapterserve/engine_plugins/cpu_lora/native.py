"""The token-by-token LoRA kernel (`lora_kernel.cpp`): built for this CPU, loaded, called.

Built with the system's g++ (`-O3 -march=native`: vectorised for the CPU it runs on) into
the cache, one file per source, compiler and CPU, written under a temporary name and
renamed, so that engine processes starting together never load a half-written file; a
build takes ~1 s. Loaded with ctypes: a plain C ABI, no PyTorch headers to compile
against, one foreign call per layer (~6 us with its arguments' conversion). The kernel
splits a layer's tokens over PyTorch's OpenMP threads (`-fopenmp`, linked to the runtime
PyTorch has loaded; one thread where loading it brought another runtime).

Where it cannot be built or loaded (no compiler, another architecture), `load_kernel`
returns None, says why in the log, and the fused path keeps to its PyTorch forms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from adapterserve.config import default_cache_dir
from adapterserve.dtypes import cpu_identity

log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")

SOURCE = Path(__file__).with_name("lora_kernel.cpp")
ABI_VERSION = 2  # adapterserve_lora_kernel_version() of the source this module calls
# 0: never use the kernel (the PyTorch forms only); set from the `cpu_lora_kernel` setting
ENV_SWITCH = "ADAPTERSERVE_LORA_KERNEL"
# the kernel's OpenMP threads; unset or 0: as many as PyTorch runs (1: how it ran before
# it was threaded, for the bench's `kernel1` variant)
ENV_THREADS = "ADAPTERSERVE_LORA_KERNEL_THREADS"
COMPILER = os.environ.get("CXX", "g++")
# -Wno-psabi: GCC notes that 64-byte vectors pass differently without AVX512 (internal
# functions only; the exported ABI is plain pointers and integers)
# -fopenmp: the kernel splits a layer's tokens over PyTorch's OpenMP threads. The library
# it links by name (libgomp.so.1) is the one PyTorch has already loaded, so no second
# thread pool is made (`load_kernel` checks that).
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wno-psabi")
_ARGUMENTS = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,  # y, y stride, x, x stride, k
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # a, rank_sum, slot per token, tokens
    ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,  # slices, sizes, b pointers, rank
    ctypes.c_int64, ctypes.c_float, ctypes.c_int64,  # live slices, scale, threads
]


def kernel_dir() -> Path:
    return default_cache_dir() / "kernels"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def threads_from_env() -> int:
    try:
        return max(0, int(os.environ.get(ENV_THREADS, "0")))
    except ValueError:
        return 0


def _compiler_version() -> str:
    done = subprocess.run([COMPILER, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.splitlines()[0] if done.stdout else ""


def built_kernel_path() -> Path:
    """Where the kernel for this source, compiler and CPU is (built if it is not yet)."""
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), _compiler_version(), " ".join(FLAGS), platform.machine(), cpu_identity()]).encode()
    ).hexdigest()[:16]
    target = kernel_dir() / f"lora_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run([COMPILER, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{COMPILER} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    return target


class LoraKernel:
    """The loaded kernel: `apply` runs one LoRA linear layer over a batch's tokens."""

    def __init__(self, library: ctypes.CDLL, threads: int = 0) -> None:
        self._threads = threads
        self._by_dtype = {torch.float32: library.adapterserve_lora_apply_f32, torch.bfloat16: library.adapterserve_lora_apply_bf16}
        for function in self._by_dtype.values():
            function.argtypes, function.restype = _ARGUMENTS, None

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._by_dtype

    def apply(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, rank_sum: int, slot_of: torch.Tensor,
              sizes: ctypes.Array, b_pointers: ctypes.Array, rank: int, live: int, scale: float) -> None:
        """y[t] += scale * x[t] A[slot]^T B[slot]^T per token (`lora_kernel.cpp`). The caller
        guarantees the layout: rows of x and y with unit column stride, `a` and each B
        contiguous, `slot_of` int64 and contiguous, one dtype for x, y, a and b."""
        self._by_dtype[y.dtype](
            y.data_ptr(), y.stride(0), x.data_ptr(), x.stride(0), x.shape[1], a.data_ptr(), rank_sum,
            slot_of.data_ptr(), slot_of.shape[0], len(sizes), sizes, b_pointers, rank, live, scale, self._threads,
        )


@functools.cache
def load_kernel() -> LoraKernel | None:
    """The kernel for this CPU, or None (logged) where it is switched off or cannot be built."""
    if not enabled_by_env():
        log.info("CPU LoRA kernel: off (%s=0)", ENV_SWITCH)
        return None
    try:
        runtimes = set(openmp_runtimes())
        library = ctypes.CDLL(str(built_kernel_path()))
        added = set(openmp_runtimes()) - runtimes
        version = library.adapterserve_lora_kernel_version
        version.restype = ctypes.c_int64
        if version() != ABI_VERSION:
            raise RuntimeError(f"kernel ABI {version()}, expected {ABI_VERSION}")
    except Exception as error:  # any failure: the PyTorch forms serve instead
        log.warning("CPU LoRA kernel: not available, the PyTorch forms serve (%s)", error)
        return None
    if added:  # not PyTorch's runtime: two thread pools would contend for the cores
        log.warning("CPU LoRA kernel: it loaded the OpenMP runtime %s beside PyTorch's, it runs on one thread", sorted(added))
        threads = 1
    else:
        threads = threads_from_env()
    log.info("CPU LoRA kernel: loaded %s in pid %d (threads: %s)", library._name, os.getpid(), threads or "PyTorch's")
    return LoraKernel(library, threads)


def openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; else unknown: [])."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line[line.index("/"):] for line in maps.splitlines() if "/" in line}
    return sorted(p for p in paths if Path(p).name.startswith(("libgomp", "libiomp", "libomp")))


def pointer_array(tensors) -> ctypes.Array:
    """The data pointers of `tensors` as a C array (kept alive by the caller with them)."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def int64_array(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)
