"""The fine-tuning jobs' runner: a queue served one job at a time (by default), each job
trained by the trainer (finetuning/trainer.py) where its launcher runs it
(finetuning/launchers.py: a process of its own at low priority with bounded threads, or
a Ray task), so the server keeps answering while a job runs.

What the trainer reports becomes the job's events, checkpoints and trained tokens. A job
that succeeds is published (finetuning/publishing.py: an adapter loaded by the shared
host, or a full model hosted by the dedicated host), and its `fine_tuned_model` answers
at once, with no restart. A job cancelled or failed leaves no
model registered and no folder behind. On a restart, queued jobs run; a job that was
running resumes from its last checkpoint (exactly: the trainer saved its optimizer's state
and step there), or, with no checkpoint yet, is failed with that reason.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .naming import adapter_name, fine_tuned_model
from .serving_first import pause_while_serving
from .trainer import last_resumable
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
    def __init__(self, settings, store: FineTuningStore, publisher, base_path: Path, base_name: str, launcher,
                 busy: Callable[[], bool] | None = None):
        self.settings = settings
        self.launcher = launcher  # where trainers run (finetuning/launchers.py)
        self.busy = busy  # whether the engines beside a local trainer are serving (finetuning/serving_first.py)
        self.store = store
        self.publisher = publisher
        self.base_path, self.base_name = Path(base_path), base_name
        self.work_dir = store.root / "jobs"
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running: dict[str, object] = {}  # job id -> its Training (finetuning/launchers.py)
        self._cancelled: set[str] = set()
        self.observer = RunnerObserver()

    async def start(self) -> None:
        for job in self.store.jobs(None, ("running", "validating_files")):
            checkpoint = last_resumable(self.work_dir / job["id"] / "checkpoints")
            if checkpoint is not None:  # queued again: `_run` resumes it from there
                self.store.update_job(job["id"], status="queued")
                self.store.add_event(job["id"], f"The server restarted while the job ran; it resumes from its checkpoint "
                                     f"at {checkpoint.name.replace('-', ' ')}")
                continue
            reason = "the server stopped while the job ran, before its first checkpoint; create the job again"
            self.store.update_job(job["id"], status="failed", finished_at=int(time.time()),
                                  error={"code": "server_restarted", "message": reason, "param": None})
            self.store.add_event(job["id"], f"Job failed: {reason}", level="error")
        self._task = asyncio.create_task(self._serve_queue())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for training in list(self._running.values()):
            training.kill()

    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, job: dict) -> None:
        self._cancelled.add(job["id"])
        training = self._running.get(job["id"])
        if training is not None:
            training.kill()
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
        # a job queued again after a restart resumes from its last checkpoint (a new job has no folder)
        resume_from = last_resumable(folder / "checkpoints")
        if resume_from is None:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        spec = {
            "base_path": str(self.base_path), "training_file": str(self.store.file_path(body["training_file"])),
            "validation_file": str(self.store.file_path(body["validation_file"])) if body.get("validation_file") else None,
            "out_dir": str(folder / "adapter"), "checkpoints_dir": str(folder / "checkpoints"),
            "threads": self.settings.fine_tuning_threads, **body["resolved"],
            "resume_from": str(resume_from) if resume_from else None,
        }
        training = await self.launcher.start(spec, folder)
        self._running[job_id] = training
        if job_id in self._cancelled:  # cancelled while it was being started
            training.kill()
        else:  # "running" only once it can be stopped by a cancel
            self.store.update_job(job_id, status="running")
            self.store.add_event(job_id, f"Fine-tuning job started in {self.launcher.where}")
        watch = None
        if self.busy is not None and hasattr(training, "pause"):  # a trainer beside the engines: serving first
            watch = asyncio.create_task(pause_while_serving(training, self.busy))
        try:
            done = await self._follow(job_id, training.messages())
            code = await training.wait()
        finally:
            self._running.pop(job_id, None)
            if watch is not None:
                watch.cancel()
        if job_id in self._cancelled:
            shutil.rmtree(folder / "adapter", ignore_errors=True)
            return
        if code != 0 or done is None or done.get("type") != "done":
            reason = done.get("message") if done else training.failure()
            self._fail(job_id, "training_failed", reason or f"the trainer exited with {code}")
            return
        await self._register(job, folder / "adapter", done)

    async def _follow(self, job_id: str, messages) -> dict | None:
        """The trainer's reports, as events and checkpoints; its last report."""
        last, tokens = None, 0
        async for message in messages:
            last = message
            if message.get("type") == "step":
                self.store.update_job(job_id, trained_tokens=message["trained_tokens"])
                self.observer.tokens_trained(message["trained_tokens"] - tokens)
                tokens = message["trained_tokens"]
                if message["step"] % STEP_EVENTS_EVERY == 0:
                    self.store.add_event(job_id, f"Step {message['step']}/{message['total_steps']}: training loss={message['train_loss']}",
                                         data={"step": message["step"], "train_loss": message["train_loss"],
                                               "total_steps": message["total_steps"]}, kind="metrics")
            elif message.get("type") == "resumed":
                tokens = message["trained_tokens"]
                self.store.add_event(job_id, f"Resumed at step {message['step']}/{message['total_steps']}")
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
