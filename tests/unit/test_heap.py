"""Free heap pages are given back to the operating system (adapterserve/engine_plugins/heap.py)."""

from __future__ import annotations

import ctypes

import psutil
import pytest

from adapterserve.engine_plugins import heap


def test_freed_heap_memory_is_given_back():
    """Many small blocks freed below one still in use (the heap's top: free() cannot shrink
    the heap past it) leave their pages in glibc's heap; a trim gives the whole free pages
    back. (Large blocks would be mapped and unmapped on their own.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    process = psutil.Process()
    blocks = [libc.malloc(4096) for _ in range(40_000)]  # ~160 MB of heap
    for block in blocks:
        ctypes.memset(block, 1, 4096)
    keep = blocks[-1]
    for block in blocks[:-1]:
        libc.free(block)
    held = process.memory_full_info().uss
    assert heap.release_free_memory()
    assert held - process.memory_full_info().uss > 100 * 2**20
    libc.free(keep)
