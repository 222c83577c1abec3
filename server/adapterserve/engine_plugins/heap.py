"""Free C heap pages given back to the operating system (glibc's `malloc_trim`).

glibc keeps the memory that Python and native libraries free in its heap and arenas, for
reuse. A server process that has imported vLLM, read and validated adapters and served a
while (the API process), or run an engine's warm-up (the engine core and its worker), holds
tens of MB of such free pages resident. `malloc_trim(0)` gives back every whole free page.
Measured on the EPYC with a shared server after a few requests: the API process 629 -> 579
MB USS, the engine core 512 -> 479, the worker 1307 -> 1282.

Called at each metrics reading (every `metrics_refresh_s`) in the API process and, through
the engines' memory reports (`worker_report`), in their processes: a trim of these heaps
takes ~1-5 ms. Here, beside the code that runs in vLLM's processes, because both sides call it.
Elsewhere than glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _malloc_trim():
    try:
        function = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


def release_free_memory() -> bool:
    """Give the heap's free pages back; True if any was given back."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
