"""How many CPUs vLLM keeps free of an engine worker's threads.

vLLM's CPU worker binds its OpenMP threads to every usable CPU but one, which it reserves
for its scheduler process and the API server ("reserve_cpu_num" in vLLM's log). On a
2-core machine that halves the compute of every step. Measured on the 2-core Xeon of
bench/RESULTS.md (then `bench/lora_rank_fit.py --variants auto allcores --rounds 2`; now
`python -m bench.ab run --servers adapterserve adapterserve:reserve1`): with no
CPU reserved, base-only 117 against 88 tok/s, LoRA-mixed 1 / 3 / 8 adapters 105 / 91 / 86
against 79 / 70 / 62, and TTFT p50 0.8 against 1.4 s; the scheduler and the API server
then share the cores with the worker, which costs less than the idle core did.

Above 2 CPUs vLLM's reservation stands (not measured here: one core of many is a small
share, and a worker thread preempted by the scheduler stalls every other thread at the
next barrier).
"""

from __future__ import annotations

import os

ENV_RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"  # read by vLLM in each engine process
NONE_RESERVED_UP_TO = 2  # usable CPUs: at most this many, no CPU is reserved


def usable_cpus() -> int:
    """The CPUs vLLM binds an engine's threads from (its own count: this process's affinity)."""
    from vllm.platforms.cpu import get_max_threads

    return get_max_threads()


def reserved_cpus(setting: int | None) -> int | None:
    """The CPUs to reserve: the setting if given, else the environment's if set (vLLM's own
    variable), else 0 on a machine of at most `NONE_RESERVED_UP_TO` CPUs; None: vLLM's default."""
    if setting is not None:
        return setting
    if ENV_RESERVED in os.environ:
        return None  # the operator's, read by vLLM as is
    return 0 if usable_cpus() <= NONE_RESERVED_UP_TO else None
