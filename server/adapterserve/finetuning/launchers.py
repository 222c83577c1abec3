"""Where a job's trainer (finetuning/trainer.py) runs, behind one seam the job runner uses:

- `LocalLauncher`: a process of its own on this machine, at low priority, in its own
  process group (a cancel kills the group);
- `RayLauncher` (Ray Serve, in rayserve/fine_tuning.py: only rayserve/ imports Ray): a
  Ray task with CPUs of its own (`--fine-tuning-threads`), never inside a serving
  replica. The task gets the training files' bytes and sends the trained folder's files
  back, so no folder is shared.

Either way a `Training` yields the trainer's reports as dicts, can be killed, and ends
with its exit status; what it trained is in `spec["out_dir"]` on this machine. A local
one can also be paused and resumed (finetuning/serving_first.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from .trainer import environment

log = logging.getLogger(__name__)


class LocalTraining:
    def __init__(self, process, log_path: Path):
        self.process, self.log_path = process, log_path

    async def messages(self) -> AsyncIterator[dict]:
        async for raw in self.process.stdout:
            try:
                yield json.loads(raw)
            except ValueError:
                continue

    def kill(self) -> None:
        self._signal(signal.SIGKILL)  # a stopped (paused) process is killed too

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)  # the trainer's own process group
        except ProcessLookupError:
            pass

    async def wait(self) -> int:
        return await self.process.wait()

    def failure(self) -> str:
        return self.log_path.read_text(errors="replace")[-300:]


class LocalLauncher:
    where = "a process of its own"  # (the job's first event says where it trains)

    def __init__(self, settings):
        self.settings = settings

    async def start(self, spec: dict, folder: Path) -> LocalTraining:
        (folder / "spec.json").write_text(json.dumps(spec))
        log_path = folder / "trainer.log"
        with log_path.open("wb") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "adapterserve.finetuning.trainer", str(folder / "spec.json"),
                stdout=asyncio.subprocess.PIPE, stderr=errors, env=environment(spec["threads"]), start_new_session=True,
            )
        return LocalTraining(process, log_path)
