"""Engine construction runs off the event loop; a stop during it leaves nothing behind;
the restart back-off."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from adapterserve.hosting.engine import EngineSpec, VllmEngine
from adapterserve.hosting.engine_processes import construct_in_thread, stop_trees


def test_construction_runs_in_a_thread_while_the_loop_keeps_running():
    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        built = await asyncio.wrap_future(construct_in_thread(lambda: (time.sleep(0.5), threading.current_thread())[1]))
        ticking.cancel()
        return built, ticks

    built, ticks = asyncio.run(scenario())
    assert built is not threading.main_thread()
    assert ticks >= 20  # the loop ran while the construction blocked its thread


class BuiltClient:
    """What the construction returns, as far as stopping it goes."""

    def __init__(self):
        self.shut_down = False

    def shutdown(self, timeout=None):
        self.shut_down = True


def test_a_stop_during_the_construction_waits_for_it_and_stops_what_it_built(tmp_path):
    engine = VllmEngine(EngineSpec(name="e", model_path=tmp_path, served_model_name="m"))
    built = BuiltClient()
    engine._construction = construct_in_thread(lambda: (time.sleep(0.3), built)[1])
    engine.stop(wait_s=1)  # as the host's stop does when the server shuts down mid-restart
    assert built.shut_down and engine.client is None


def test_restart_backoff_doubles_while_an_engine_keeps_dying_and_resets_after_a_long_life():
    from adapterserve.hosting.backoff import Backoff

    now = [0.0]
    backoff = Backoff(2.0, 30.0, clock=lambda: now[0])
    assert backoff.wait_s() == 0.0  # the first restart: at once
    backoff.started()
    waits = []
    for _ in range(5):  # dies again right after each start
        now[0] += 1.0
        waits.append(backoff.wait_s())
        backoff.started()
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0]
    now[0] += 31.0  # stayed up longer than the ceiling
    assert backoff.wait_s() == 0.0
    backoff.started()
    now[0] += 1.0
    assert backoff.wait_s() == 2.0


def test_engines_start_together_and_the_first_failure_is_raised_once_all_have_ended():
    from adapterserve.hosting.engine import start_together

    async def scenario():
        began = {name: asyncio.Event() for name in ("generate", "classify", "broken")}
        ended = []

        async def start(name, other, fail=False):
            began[name].set()
            await asyncio.wait_for(began[other].wait(), 2)  # times out unless the other runs meanwhile
            if fail:
                raise RuntimeError(f"{name} did not start")
            await asyncio.sleep(0.2)
            ended.append(name)

        await start_together([start("generate", "classify"), start("classify", "generate")])
        assert sorted(ended) == ["classify", "generate"]
        ended.clear()
        began["generate"].clear()
        try:
            await start_together([start("broken", "generate", fail=True), start("generate", "broken")])
        except RuntimeError as exc:
            return str(exc), ended
        return None, ended

    raised, ended = asyncio.run(scenario())
    assert raised == "broken did not start"
    assert ended == ["generate"]  # raised only after the other start had ended


def test_the_shared_host_starts_its_generate_and_classify_engines_together(settings, registry, tiny_base, store):
    from adapterserve.hosting.shared import SharedBaseHost
    from tests.adapter_factory import _head
    from tests.fakes import FakeEngine
    from tests.unit.conftest import HIDDEN

    _head(store, tiny_base, "sentiment", (2, HIDDEN), labels=["negative", "positive"])
    registry.scan()
    events = []

    class SlowStartEngine(FakeEngine):
        async def start(self):
            events.append(("begin", self.name))
            await asyncio.sleep(0.1)
            await super().start()
            events.append(("end", self.name))

    async def scenario():
        host = SharedBaseHost(settings, tiny_base.path, tiny_base.name, registry, engine_factory=SlowStartEngine)
        await host.start()
        await host.stop()

    asyncio.run(scenario())
    assert [kind for kind, _ in events] == ["begin", "begin", "end", "end"]
    assert {name for _, name in events} == {"generate", "classify"}


def test_the_slots_modules_reach_vllm_as_its_flag():
    from pathlib import Path

    from adapterserve.hosting.engine_spec import EngineSpec, parse_vllm_args

    spec = EngineSpec(name="generate", model_path=Path("/models/base"), served_model_name="base", enable_lora=True,
                      lora_target_modules=("q_proj", "v_proj"))
    assert parse_vllm_args(spec.cli_args()).lora_target_modules == ["q_proj", "v_proj"]
    every = EngineSpec(name="generate", model_path=Path("/models/base"), served_model_name="base", enable_lora=True)
    assert parse_vllm_args(every.cli_args()).lora_target_modules is None


# A parent that starts a child every 20 ms and one more when sent SIGTERM: what an engine
# core starting its workers looks like to a stop, at its worst.
SPAWNING = """
import signal, subprocess, sys, time
def sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
signal.signal(signal.SIGTERM, lambda *_: (sleeper(), sys.exit(0)))
print("ready", flush=True)
while True:
    sleeper()
    time.sleep(0.02)
"""


def test_stopping_an_unfinished_start_leaves_no_process_it_was_starting():
    parent = subprocess.Popen([sys.executable, "-c", SPAWNING], stdout=subprocess.PIPE, start_new_session=True)
    group = parent.pid  # its own session: whatever is left is killed by this group below
    try:
        assert parent.stdout.readline() == b"ready\n"
        time.sleep(0.3)  # a dozen children, and more starting
        stop_trees("test", [parent.pid])
        parent.wait(timeout=5)
        time.sleep(0.5)  # a child started by a missed process would be running by now
        left = [p.pid for p in psutil.process_iter() if _in_group(p, group) and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"left running: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
