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

Native code is loaded only from a directory the server owns: `<cache dir>/kernels` (the
server passes its --cache-dir in ADAPTERSERVE_KERNEL_DIR), created with mode 0700 and
checked to belong to this process's user, and a library only when it is a regular file of
that user that nobody else may write, checked again after it is built: a directory or a
file another user made first (the names are predictable) is never loaded.

The compiled graph's op (`lora_op.cpp`, the kernel included) is built the same way, against
PyTorch's headers and libraries (~6 s): `load_op_state` loads it, which registers the op,
and returns the handle that sets the op's state; None where it cannot be built, and then
compiled.py registers the op in Python instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import stat
import subprocess
import tempfile
from pathlib import Path

import torch

from adapterserve.config import default_cache_dir
from adapterserve.dtypes import cpu_identity

log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")

SOURCE = Path(__file__).with_name("lora_kernel.cpp")
ABI_VERSION = 3  # adapterserve_lora_kernel_version() of the source this module calls
OP_SOURCE = Path(__file__).with_name("lora_op.cpp")
# 0: the compiled graph's op stays in Python (for the bench's A/B; the kernel is unaffected)
ENV_OP_SWITCH = "ADAPTERSERVE_LORA_OP"
# 0: never use the kernel (the PyTorch forms only); set from the `cpu_lora_kernel` setting
ENV_SWITCH = "ADAPTERSERVE_LORA_KERNEL"
# where the kernel and op are built (the server's cache dir; unset: the default cache dir)
ENV_DIR = "ADAPTERSERVE_KERNEL_DIR"
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
    return Path(os.environ.get(ENV_DIR) or default_cache_dir() / "kernels")


class UntrustedNativeCode(RuntimeError):
    """A build directory or library this process's user does not own alone."""


def owned_directory(path: Path) -> Path:
    """`path`, created with mode 0700 if missing, refused unless it is a real directory of
    this process's user; write access for others is taken away (it is ours)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedNativeCode(f"{path} is not a directory (a link?)")
    if info.st_uid != os.geteuid():
        raise UntrustedNativeCode(f"{path} belongs to uid {info.st_uid}, not to this server's {os.geteuid()}")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def is_trusted_library(path: Path) -> bool:
    """A regular file (not a link) of this process's user that no one else may write."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def enabled_by_env(switch: str = ENV_SWITCH) -> bool:
    return os.environ.get(switch, "1").strip().lower() not in ("0", "false", "no", "off")


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
    return _built("lora_kernel", [SOURCE], [*FLAGS, str(SOURCE)])


def built_op_path() -> Path:
    """Where the compiled graph's op for this source, PyTorch, compiler and CPU is (built if
    it is not yet): linked to the PyTorch libraries this process runs, found at run time."""
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()[0]
    flags = [
        *FLAGS, "-std=c++20",  # PyTorch's headers use C++20 initialisers (C++17 warns)
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        str(OP_SOURCE), f"-L{libraries}", f"-Wl,-rpath,{libraries}", "-lc10", "-ltorch_cpu",
    ]
    return _built("lora_op", [OP_SOURCE, SOURCE], flags, extra=torch.__version__)


def _built(name: str, sources: list[Path], arguments: list[str], extra: str = "") -> Path:
    key = hashlib.sha256(
        "\n".join([*(source.read_text() for source in sources), _compiler_version(), " ".join(arguments),
                   platform.machine(), cpu_identity(), extra]).encode()
    ).hexdigest()[:16]
    target = owned_directory(kernel_dir()) / f"{name}-{key}.so"
    if is_trusted_library(target):
        return target
    if os.path.lexists(target):  # not ours alone: never loaded, built again in its place
        log.warning("CPU LoRA native code: %s is not a file of this user alone; building it again", target)
        os.unlink(target)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run([COMPILER, *arguments, "-o", str(built)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{COMPILER} failed: {done.stderr.strip()[-2000:]}")
        os.chmod(built, 0o700)
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    if not is_trusted_library(target):  # checked again: what is loaded is what was checked
        raise UntrustedNativeCode(f"{target} changed hands after it was built")
    return target


class LoraKernel:
    """The loaded kernel: `apply` runs one LoRA linear layer over a batch's tokens."""

    def __init__(self, library: ctypes.CDLL, threads: int = 0) -> None:
        self.threads = threads  # 0: as many as PyTorch runs
        self.name = Path(library._name).name  # names its source, compiler and CPU (`_built`)
        bf16_form = library.adapterserve_lora_kernel_bf16_form
        bf16_form.restype = ctypes.c_int64
        self.bf16_form = bool(bf16_form())  # built with its bf16 form (the CPU has AVX512-BF16)
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
            slot_of.data_ptr(), slot_of.shape[0], len(sizes), sizes, b_pointers, rank, live, scale, self.threads,
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


class LoraOpState:
    """What the compiled graph's C++ op (`lora_op.cpp`) remembers, set from Python: the
    slots' generation, each wrapper's step (its token-to-slot array, and whether its plan is
    the kernel's), and per layer: the slices each slot changes, and the kernel's arguments
    where it applied the layer. The caller keeps every tensor it publishes alive while it is
    published."""

    DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

    def __init__(self, library: ctypes.CDLL, one_thread: bool) -> None:
        self._one_thread = one_thread  # the op brought another OpenMP runtime (see load_kernel)
        self._wrappers = 0
        i64, pointer = ctypes.c_int64, ctypes.c_void_p
        self._set_generation = library.adapterserve_lora_op_set_generation
        self._set_generation.argtypes, self._set_generation.restype = [i64], None
        self._set_step = library.adapterserve_lora_op_set_step
        self._set_step.argtypes, self._set_step.restype = [i64, i64, pointer, i64], None
        self._remember_idle = library.adapterserve_lora_op_remember_idle
        self._remember_idle.argtypes, self._remember_idle.restype = [i64, i64, i64, pointer, i64], None
        self._remember_kernel = library.adapterserve_lora_op_remember_kernel
        self._remember_kernel.argtypes = [
            i64, i64, i64, pointer, i64,  # key, generation, wrapper, live_of_slot, slots
            i64, pointer, i64, i64, i64,  # dtype, a, k, rank_sum, slices
            pointer, pointer, i64, i64,  # sizes, b, rank, threads
        ]
        self._remember_kernel.restype = None

    def new_wrapper(self) -> int:
        """An index for a punica wrapper's step (one per engine in the process)."""
        self._wrappers += 1
        return self._wrappers - 1

    def set_generation(self, generation: int) -> None:
        self._set_generation(generation)

    def set_step(self, wrapper: int, slot_of: torch.Tensor | None, kernel: bool = False) -> None:
        """The wrapper's step maps its tokens to slots by `slot_of` (int64, contiguous; None:
        not known yet); `kernel`: its plan applies the layers token by token."""
        if slot_of is None:
            self._set_step(wrapper, -1, None, 0)
        else:
            self._set_step(wrapper, slot_of.shape[0], slot_of.data_ptr(), int(kernel))

    def remember_idle(self, key: int, generation: int, wrapper: int, live_of_slot: list[int]) -> None:
        """Layer `key` changes in slot s the slices `live_of_slot[s]` (bits); not by the kernel."""
        self._remember_idle(key, generation, wrapper, int64_array(live_of_slot), len(live_of_slot))

    def remember_kernel(self, key: int, generation: int, wrapper: int, live_of_slot: list[int], slots,
                        kernel_args) -> None:
        """As `remember_idle`, applied by the kernel (`kernel_args`: punica.kernel_args of `slots`)."""
        kernel, sizes, b_pointers = kernel_args
        threads = 1 if self._one_thread else kernel.threads
        self._remember_kernel(
            key, generation, wrapper, int64_array(live_of_slot), len(live_of_slot), self.DTYPE_CODES[slots.a.dtype],
            slots.a.data_ptr(), slots.a.shape[1], slots.rank_sum, len(sizes), sizes, b_pointers, slots.ranks[0], threads,
        )


@functools.cache
def load_op_state() -> LoraOpState | None:
    """Build and load the compiled graph's C++ op, which registers it; the handle to its
    state, or None (logged) where it is switched off or cannot be built or loaded."""
    if not (enabled_by_env() and enabled_by_env(ENV_OP_SWITCH)):
        return None
    try:
        path = built_op_path()
        runtimes = set(openmp_runtimes())
        library = ctypes.CDLL(str(path))  # its static initialiser registers the op
        added = set(openmp_runtimes()) - runtimes
    except Exception as error:  # any failure: compiled.py registers the op in Python
        log.warning("CPU LoRA op: not available, the compiled graph's op runs in Python (%s)", error)
        return None
    # No version check as for the kernel: loading registered the op already, and the file's
    # name is a hash of this source, so it is the source these ctypes calls were written for.
    log.info("CPU LoRA op: loaded %s in pid %d", path, os.getpid())
    return LoraOpState(library, one_thread=bool(added))


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
