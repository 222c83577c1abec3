"""Serving first (finetuning/serving_first.py): a trainer beside the engines is paused
while they have requests and resumed once they have been idle for a moment; a real
process is stopped and continued by its process group."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil

from adapterserve.finetuning.launchers import LocalTraining
from adapterserve.finetuning.serving_first import engines_busy, pause_while_serving


class Recorded:
    def __init__(self):
        self.calls: list[str] = []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")


def test_paused_while_busy_resumed_after_the_quiet_time_and_left_running_at_the_end():
    training, busy = Recorded(), {"now": False}

    async def scenario():
        watch = asyncio.create_task(pause_while_serving(training, lambda: busy["now"], poll_s=0.01, quiet_s=0.1))
        await asyncio.sleep(0.05)
        assert training.calls == []  # idle engines: never paused
        busy["now"] = True
        await asyncio.sleep(0.05)
        assert training.calls == ["pause"]  # once, however long it stays busy
        busy["now"] = False
        await asyncio.sleep(0.05)
        assert training.calls == ["pause"]  # not before the quiet time
        await asyncio.sleep(0.15)
        assert training.calls == ["pause", "resume"]
        busy["now"] = True
        await asyncio.sleep(0.05)
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        assert training.calls == ["pause", "resume", "pause", "resume"]  # the job's end leaves it running

    asyncio.run(scenario())


def test_engines_are_busy_while_one_has_an_unfinished_request():
    def engine(unfinished):
        return SimpleNamespace(unfinished_requests=lambda: unfinished)

    assert not engines_busy(SimpleNamespace(engines=lambda: [engine(0), engine(0)]))
    assert engines_busy(SimpleNamespace(engines=lambda: [engine(0), engine(2)]))


def test_a_local_trainer_is_stopped_and_continued_by_its_process_group():
    process = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"], start_new_session=True)
    try:
        training = LocalTraining(SimpleNamespace(pid=process.pid), log_path=None)
        training.pause()
        time.sleep(0.2)
        assert psutil.Process(process.pid).status() == psutil.STATUS_STOPPED
        training.resume()
        time.sleep(0.2)
        assert psutil.Process(process.pid).status() != psutil.STATUS_STOPPED
        training.pause()
        training.kill()  # a paused trainer is killed too
        assert process.wait(timeout=10) == -9
    finally:
        if process.poll() is None:
            process.kill()
