"""The settings an engine's own processes need, as the environment they start with.

vLLM passes no per-engine setting to the plugins it loads in its processes (the CPU LoRA
path, the non-finite watch) nor lets one choose its CPU reservation per engine: its
processes read environment variables, inherited when they are spawned. So these settings
travel explicitly in each engine's spec (`EngineSpec.environment`, made here from the
settings), and the engine sets them in the one place it constructs vLLM
(`VllmEngine.start`), just before its processes are spawned.
"""

from __future__ import annotations

import logging
import os

from adapterserve.config import Settings

from .cpu_cores import ENV_MULTIPROCESSING, ENV_RESERVED, reserved_cpus, worker_process
from .nonfinite import ENV_COUNT_NANS

log = logging.getLogger(__name__)


def engine_environment(settings: Settings, runner: str) -> dict[str, str]:
    from adapterserve.engine_plugins.cpu_lora import autotune, native
    from adapterserve.engine_plugins.cpu_lora.plugin import ENV_SWITCH

    environment = {
        ENV_SWITCH: "1" if settings.grouped_lora_ops else "0",
        native.ENV_SWITCH: "1" if settings.cpu_lora_kernel else "0",
        autotune.ENV_SWITCH: "1" if settings.cpu_lora_autotune else "0",
        native.ENV_DIR: str(settings.cache_dir / "kernels"),  # the native kernel is built and loaded only there
    }
    reserved = reserved_cpus(settings.engine_reserved_cpus)
    if reserved is not None:  # None: vLLM's own default (or the operator's variable, read as is)
        environment[ENV_RESERVED] = str(reserved)
    own_process = worker_process(settings.engine_worker_process)
    if settings.engine_reserved_cpus is not None and not own_process:  # the machine chose (both set: the settings refuse)
        log.warning("--engine-reserved-cpus has no effect: on this machine (at most 2 CPUs) each engine's model runs "
                    "in its engine core's process, where vLLM binds no threads; add --engine-worker-process to use it")
    # read by vLLM's CPU platform: "0" runs the model in the engine core's process
    environment[ENV_MULTIPROCESSING] = "1" if own_process else "0"
    if runner == "generate":
        environment[ENV_COUNT_NANS] = "1"  # the workers count NaN logits per request
    return environment


def apply(environment: dict[str, str]) -> None:
    """Set an engine's environment in this process, whose children inherit it; before vLLM
    builds the engine's configuration, which reads some of it (the executor on the CPU)."""
    os.environ.update(environment)
    if environment.get(ENV_MULTIPROCESSING) == "0":
        quiet = logging.getLogger("vllm.engine.arg_utils")
        if not any(isinstance(f, NotTheLaunchersSeed) for f in quiet.filters):
            quiet.addFilter(NotTheLaunchersSeed())


class NotTheLaunchersSeed(logging.Filter):
    """Drops vLLM's warning that, without multiprocessing, its seed "may affect the random
    state of the Python process that launched vLLM": true of its offline `LLM`, whose engine
    runs in that process; an AsyncLLM's engine core is a process of its own, whichever
    executor it runs, so this process's random state is untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{ENV_MULTIPROCESSING} is set to False" not in record.getMessage()
