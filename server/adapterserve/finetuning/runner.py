"""The fine-tuning jobs' runner: a queue served one job at a time (by default), each job
trained in a process of its own (finetuning/trainer.py) at low priority with bounded
threads, so the server keeps answering while a job runs.

What the trainer reports becomes the job's events, checkpoints and trained tokens. A job
that succeeds is published (finetuning/publishing.py: an adapter loaded by the shared
host, or a full model hosted by the dedicated host), and its `fine_tuned_model` answers
at once, with no restart. A job cancelled or failed leaves no
model registered and no folder behind. On a restart, queued jobs run; a job that was
running is failed with that reason (its checkpoints are kept and listed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .naming import adapter_name, fine_tuned_model
from .store import FineTuningStore

log = logging.getLogger(__name__)

STEP_EVENTS_EVERY = 1  # a metrics event per training step (small jobs: a few dozen steps)


@dataclass
class RunnerObserver:
    """What the runner reports (the metrics): tokens trained as they are, and each job's
    end with its wall time."""

    tokens_trained: Callable[[int], None] = lambda tokens: None
    job_finished: Callable[[str, float], None] = lambda state, seconds: None


class JobRunner:
    def __init__(self, settings, store: FineTuningStore, publisher, base_path: Path, base_name: str):
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.base_path, self.base_name = Path(base_path), base_name
        self.work_dir = store.root / "jobs"
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._cancelled: set[str] = set()
        self.observer = RunnerObserver()

    async def start(self) -> None:
        for job in self.store.jobs(None, ("running", "validating_files")):
            reason = "the server stopped while the job ran; create the job again (its checkpoints are kept)"
            self.store.update_job(job["id"], status="failed", finished_at=int(time.time()),
                                  error={"code": "server_restarted", "message": reason, "param": None})
            self.store.add_event(job["id"], f"Job failed: {reason}", level="error")
        self._task = asyncio.create_task(self._serve_queue())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for process in list(self._running.values()):
            _kill(process)

    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, job: dict) -> None:
        self._cancelled.add(job["id"])
        process = self._running.get(job["id"])
        if process is not None:
            _kill(process)
        if job["status"] in ("queued", "validating_files", "running"):
            self.store.update_job(job["id"], status="cancelled", finished_at=int(time.time()))
            self.store.add_event(job["id"], "Job cancelled")

    async def _serve_queue(self) -> None:
        while True:
            queued = [j for j in self.store.jobs(None, ("queued",)) if j["id"] not in self._cancelled]
            if not queued:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = queued[-1]  # the oldest (jobs are listed newest first)
            began = time.monotonic()
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one job's failure never stops the queue
                log.exception("fine-tuning job %s failed", job["id"])
                self._fail(job["id"], "internal_error", f"{type(exc).__name__}: {exc}")
            self.observer.job_finished(self.store.job(None, job["id"])["status"], time.monotonic() - began)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        if self.store.job(None, job_id)["status"] == "cancelled":
            return
        self.store.update_job(job_id, status="failed", finished_at=int(time.time()),
                              error={"code": code, "message": message, "param": None})
        self.store.add_event(job_id, f"Job failed: {message}", level="error")

    async def _run(self, job: dict) -> None:
        body, job_id = job["body"], job["id"]
        folder = self.work_dir / job_id
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        spec = {
            "base_path": str(self.base_path), "training_file": str(self.store.file_path(body["training_file"])),
            "validation_file": str(self.store.file_path(body["validation_file"])) if body.get("validation_file") else None,
            "out_dir": str(folder / "adapter"), "checkpoints_dir": str(folder / "checkpoints"),
            "threads": self.settings.fine_tuning_threads, **body["resolved"],
        }
        (folder / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(self.settings.fine_tuning_threads), "TOKENIZERS_PARALLELISM": "false"}
        with (folder / "trainer.log").open("wb") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "adapterserve.finetuning.trainer", str(folder / "spec.json"),
                stdout=asyncio.subprocess.PIPE, stderr=errors, env=env, start_new_session=True,
            )
            self._running[job_id] = process
            if job_id in self._cancelled:  # cancelled while its process was being started
                _kill(process)
            else:  # "running" only once its process can be stopped by a cancel
                self.store.update_job(job_id, status="running")
                self.store.add_event(job_id, "Fine-tuning job started")
            try:
                done = await self._follow(job_id, process)
                await process.wait()
            finally:
                self._running.pop(job_id, None)
        if job_id in self._cancelled:
            shutil.rmtree(folder / "adapter", ignore_errors=True)
            return
        if process.returncode != 0 or done is None or done.get("type") != "done":
            reason = done.get("message") if done else (folder / "trainer.log").read_text(errors="replace")[-300:]
            self._fail(job_id, "training_failed", reason or f"the trainer exited with {process.returncode}")
            return
        await self._register(job, folder / "adapter", done)

    async def _follow(self, job_id: str, process) -> dict | None:
        """The trainer's reports, as events and checkpoints; its last report."""
        last, tokens = None, 0
        async for raw in process.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            last = message
            if message.get("type") == "step":
                self.store.update_job(job_id, trained_tokens=message["trained_tokens"])
                self.observer.tokens_trained(message["trained_tokens"] - tokens)
                tokens = message["trained_tokens"]
                if message["step"] % STEP_EVENTS_EVERY == 0:
                    self.store.add_event(job_id, f"Step {message['step']}/{message['total_steps']}: training loss={message['train_loss']}",
                                         data={"step": message["step"], "train_loss": message["train_loss"],
                                               "total_steps": message["total_steps"]}, kind="metrics")
            elif message.get("type") == "checkpoint":
                self.store.add_checkpoint(job_id, message["step"], message["metrics"], Path(message["path"]))
                self.store.add_event(job_id, f"Checkpoint created at step {message['step']}")
        return last

    async def _register(self, job: dict, trained: Path, done: dict) -> None:
        """Serve what was trained under its name; undo everything if that fails."""
        name = adapter_name(job)
        try:
            await self.publisher.publish(name, trained)
        except Exception as exc:  # refused (validation, the engine, the memory budget): no half-registered model
            log.warning("fine-tuning job %s: publishing %s failed: %s", job["id"], name, exc)
            self._fail(job["id"], "registration_failed", getattr(exc, "message", str(exc)))
            return
        if job["id"] in self._cancelled:  # cancelled while it was being published
            await self.publisher.withdraw(name)
            return
        costs = {k: done.get(k) for k in ("trainable_params", "trainable_share", "train_seconds", "peak_memory_bytes",
                                          "bytes_on_disk", "valid_loss", "steps")}
        self.store.update_job(job["id"], status="succeeded", finished_at=int(time.time()), adapter=name,
                              fine_tuned_model=fine_tuned_model(job, self.base_name), trained_tokens=done["trained_tokens"],
                              costs=costs)
        self.store.add_event(job["id"], f"New fine-tuned model created: {fine_tuned_model(job, self.base_name)}", data=costs)
        self.store.add_event(job["id"], "The job has successfully completed")


def _kill(process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the trainer's own process group
    except ProcessLookupError:
        pass
