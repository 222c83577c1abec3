"""How many CPUs vLLM keeps free of an engine worker's threads, and whether the worker is a
process of its own (hosting/cpu_cores.py)."""

from __future__ import annotations

import logging
import os

import pytest

from adapterserve.config import Settings
from adapterserve.hosting import cpu_cores
from adapterserve.hosting.engine_environment import engine_environment


@pytest.mark.parametrize("cpus, expected", [(1, 0), (2, 0), (3, None), (64, None)])
def test_none_reserved_on_small_machines_vllms_default_on_larger(monkeypatch, cpus, expected):
    monkeypatch.delenv(cpu_cores.ENV_RESERVED, raising=False)
    monkeypatch.setattr(cpu_cores, "usable_cpus", lambda: cpus)
    assert cpu_cores.reserved_cpus(None) == expected


def test_the_setting_then_the_operators_variable_win(monkeypatch):
    monkeypatch.setattr(cpu_cores, "usable_cpus", lambda: 2)
    monkeypatch.setenv(cpu_cores.ENV_RESERVED, "1")
    assert cpu_cores.reserved_cpus(None) is None  # left to vLLM, which reads the variable
    # what an engine's processes start with (hosting/engine_environment.py, set by the engine)
    environment = {**os.environ, **engine_environment(Settings(), "generate")}
    assert environment[cpu_cores.ENV_RESERVED] == "1"
    environment = {**os.environ, **engine_environment(Settings(engine_reserved_cpus=0), "generate")}
    assert environment[cpu_cores.ENV_RESERVED] == "0"


def test_the_setting_is_a_flag_and_refuses_negative_counts():
    from pydantic import ValidationError

    from adapterserve.config import Settings

    assert Settings(engine_reserved_cpus=1).engine_reserved_cpus == 1
    with pytest.raises(ValidationError):
        Settings(engine_reserved_cpus=-1)


def test_cpus_reserved_without_a_worker_process_are_refused_or_said_to_do_nothing(monkeypatch, caplog):
    """vLLM binds threads (and reserves CPUs from them) in a worker process only."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="engine_reserved_cpus applies to an engine's worker process"):
        Settings(engine_reserved_cpus=1, engine_worker_process=False)
    monkeypatch.setattr(cpu_cores, "usable_cpus", lambda: 2)  # one process, unless asked
    with caplog.at_level(logging.WARNING, logger="adapterserve.hosting.engine_environment"):
        engine_environment(Settings(engine_reserved_cpus=1, engine_worker_process=True), "generate")
        engine_environment(Settings(), "generate")
        assert not caplog.records
        engine_environment(Settings(engine_reserved_cpus=1), "generate")
    assert ["--engine-reserved-cpus has no effect" in r.getMessage() for r in caplog.records] == [True]


@pytest.mark.parametrize("cpus, expected", [(1, False), (2, False), (3, True), (64, True)])
def test_the_model_runs_in_the_engine_core_on_small_machines_in_a_worker_on_larger(monkeypatch, cpus, expected):
    monkeypatch.setattr(cpu_cores, "usable_cpus", lambda: cpus)
    assert cpu_cores.worker_process(None) is expected
    assert cpu_cores.worker_process(not expected) is (not expected)  # the setting wins
    # what vLLM reads: its variable, set both ways (an operator's own is not left to chance)
    environment = engine_environment(Settings(), "generate")
    assert environment[cpu_cores.ENV_MULTIPROCESSING] == ("1" if expected else "0")
    environment = engine_environment(Settings(engine_worker_process=not expected), "classify")
    assert environment[cpu_cores.ENV_MULTIPROCESSING] == ("0" if expected else "1")


def test_vllms_warning_about_the_launchers_random_state_is_dropped_with_one_process(monkeypatch, caplog):
    from adapterserve.hosting import engine_environment as environment_module

    monkeypatch.setattr(environment_module.os, "environ", dict(os.environ))  # the test's process keeps its own
    vllm_log = logging.getLogger("vllm.engine.arg_utils")
    monkeypatch.setattr(vllm_log, "filters", [])
    warning = ("The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, this may "
               "affect the random state of the Python process that launched vLLM.")
    environment_module.apply({cpu_cores.ENV_MULTIPROCESSING: "1"})
    assert not vllm_log.filters and environment_module.os.environ[cpu_cores.ENV_MULTIPROCESSING] == "1"
    environment_module.apply({cpu_cores.ENV_MULTIPROCESSING: "0"})
    environment_module.apply({cpu_cores.ENV_MULTIPROCESSING: "0"})  # a second engine: one filter
    assert len(vllm_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger="vllm.engine.arg_utils"):
        vllm_log.warning(warning)
        vllm_log.warning("another warning")
    assert [r.getMessage() for r in caplog.records if r.name == "vllm.engine.arg_utils"] == ["another warning"]
