"""The dtype the engines serve in, and its size: one decision for the engines, the
registry's finiteness checks and the memory accounting."""

from __future__ import annotations

from pathlib import Path


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str) -> str:
    """'auto' -> bfloat16 where it is native, float32 elsewhere. Measured on a 2-core AVX2
    machine with SmolLM2-135M, 16 concurrent streams: bf16 22 tok/s, float32 83 tok/s."""
    if requested != "auto":
        return requested
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    except ImportError:
        pass
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of the dtype the engines run in ('auto' resolved)."""
    return {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}.get(resolve_dtype(dtype), 2)
