"""How an engine's processes share the CPUs: how many CPUs vLLM keeps free of an engine
worker's threads, and whether the worker is a process of its own.

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


ENV_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": vLLM's uniprocessing executor on the CPU
OWN_PROCESS_UP_TO = 2  # usable CPUs: at most this many, the worker runs in the engine core's process


def worker_process(setting: bool | None) -> bool:
    """Whether an engine's model runs in a worker process of its own: the setting if given,
    else not on a machine of at most `OWN_PROCESS_UP_TO` CPUs.

    vLLM's CPU platform runs the model in a worker process beside the engine core (its
    scheduler), which polls for the worker's results while the worker computes; with no
    CPU reserved for it (above) the two share the cores. In one process the scheduler
    waits for the model's step instead, and the engine's second interpreter (torch, vLLM:
    ~400 MB) is gone. Measured in bench/RESULTS.md (`bench.ab` variant `oneproc`).
    Above 2 CPUs vLLM's own arrangement stands: it binds the worker's threads to cores,
    which only a process of its own can have set before it starts (not measured here)."""
    if setting is not None:
        return setting
    return usable_cpus() > OWN_PROCESS_UP_TO
