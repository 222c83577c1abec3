"""The dtype the engines serve in, and its size: one decision for the engines, the
registry's finiteness checks and the memory accounting."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# bf16 is served where it measures at least this much faster than float32: float32 keeps
# the LoRA path and the references exact, so a tie goes to it.
BF16_MIN_SPEEDUP = 1.15
# The probe's shapes: a linear layer of a small LLM (1024 -> 4096) over a decode batch of
# 16 sequences and a 256-token prefill chunk, the two kinds of step an engine runs.
PROBE_ROWS = (16, 256)
PROBE_SHAPE = (1024, 4096)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str) -> str:
    """'auto' -> bfloat16 on a GPU; on a CPU, bfloat16 only where it is native *and*
    measures faster (`measured_cpu_dtype`), else float32.

    Native bf16 is not enough: on a 2-core AVX2 machine bf16 served 22 tok/s against 83 in
    float32 (emulated), on an EPYC with AVX512-bf16 bf16 served 1.5x float32, and on a
    Xeon with AVX512-bf16 (no AMX) 77 against 80 tok/s, with a slower prefill."""
    if requested != "auto":
        return requested
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    except ImportError:
        return "float32"
    return measured_cpu_dtype() if cpu_has_native_bf16() else "float32"


def cpu_identity() -> str:
    """This CPU's model, flags and count: the key of what is measured or built per CPU."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = sorted(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return f"{model}|{' '.join(flags)}|{os.cpu_count()} cpus"


def _probe_ms(dtype, rows: int, reps: int = 30) -> float:
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, PROBE_SHAPE[0], generator=generator).to(dtype)
    w = torch.randn(PROBE_SHAPE[1], PROBE_SHAPE[0], generator=generator).to(dtype)
    for _ in range(5):
        F.linear(x, w)
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def probe_cpu_dtypes() -> dict:
    """Milliseconds of the probe's steps in float32 and bfloat16 on this CPU, and the pick."""
    import torch

    timings = {name: round(sum(_probe_ms(getattr(torch, name), rows) for rows in PROBE_ROWS), 3)
               for name in ("float32", "bfloat16")}
    faster = timings["float32"] / timings["bfloat16"] >= BF16_MIN_SPEEDUP
    return {"dtype": "bfloat16" if faster else "float32", "ms": timings, "rows": PROBE_ROWS, "shape": PROBE_SHAPE}


@functools.lru_cache(maxsize=1)
def measured_cpu_dtype() -> str:
    """The dtype `auto` serves on this CPU, measured once per CPU model, flags and torch
    version and kept in the cache (~1 s the first time): every process of the server, its
    engines and its tests read the same answer."""
    import torch

    identity = f"{cpu_identity()}|torch {torch.__version__}"
    from adapterserve.config import default_cache_dir

    root = default_cache_dir()
    path = root / f"dtype-probe-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    try:
        return json.loads(path.read_text())["dtype"]
    except (OSError, ValueError, KeyError):
        pass
    result = {**probe_cpu_dtypes(), "cpu": identity}
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=root, delete=False, suffix=".tmp") as handle:
            json.dump(result, handle)
        try:
            os.link(handle.name, path)  # the first process to finish decides for all
        except FileExistsError:
            pass
        finally:
            os.unlink(handle.name)
        return json.loads(path.read_text())["dtype"]
    except (OSError, ValueError, KeyError):
        return result["dtype"]


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of the dtype the engines run in ('auto' resolved)."""
    return {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}.get(resolve_dtype(dtype), 2)
