"""`adapterserve compare`: the same tasks through the shared and the dedicated mode, one
after the other, with the same workload; the measurements go to report.build."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from adapterserve.config import Settings
from adapterserve.server_process import ServerProcess

from .measure import ADMIN_KEY, ModeRun, Workload, add_task, run_workloads, snapshot, warm_up
from .tasks import TaskSet, choose, fitting_lora_rank, lay_out

MODES = ("shared", "dedicated")
ENGINE_START_S_PER_TASK = 300  # the dedicated engines' start timeout, per task (they start together)
# The steps each mode goes through, for the progress display.
STEPS = ("start the server", "warm up", "run the workload", "measure memory", "add a task", "stop the server")


@dataclass
class CompareOptions:
    tasks: int | None = None  # None: every adapter in the stores
    kind: str = "all"  # "all", "lora" or "head"
    budget_bytes: int = 0
    workload: Workload = field(default_factory=Workload)
    adapter_dirs: list[Path] = field(default_factory=list)  # empty: the demo adapters
    config: Path | None = None  # serving settings for both modes
    train_examples: int = 64  # the training rows (compare/training.py); 0: none
    train_data: Path | None = None  # a chat JSONL; None: the pirate demo recipe's


def prepare_tasks(settings: Settings, options: CompareOptions, workdir: Path) -> tuple[TaskSet, Path]:
    """The chosen adapters and their merged full models (merged once, then cached)."""
    from adapterserve.registry.store import base_info, open_registry
    from adapterserve.training.demo import ensure_demo_adapters
    from adapterserve.training.merge import merge_adapters, merged_store

    base = base_info(settings)
    stores = options.adapter_dirs or [ensure_demo_adapters(settings, base.path)]
    registry = open_registry(settings, stores)
    chosen = choose(list(registry.adapters.values()), options.tasks, options.kind)
    records = list({record.name: record for _, record in chosen}.values())
    merged = merge_adapters(base.path, records, merged_store(settings.cache_dir, base.path))
    return lay_out(chosen, merged, workdir), base.path


def server_args(mode: str, taskset: TaskSet, options: CompareOptions) -> list[str]:
    """The flags of each mode's server; both get the user's serving settings (--config)."""
    args = ["--config", str(options.config)] if options.config else []
    if mode == "shared":
        return args + [
            "--no-demo-adapters", "--adapter-dirs", str(taskset.adapter_store), "--admin-api-key", ADMIN_KEY,
            "--max-lora-rank", str(fitting_lora_rank([t.rank for t in taskset.tasks])),
            # every task's adapter stays in memory, as "base + N x adapter" assumes
            "--max-cpu-loras", str(max(16, len(taskset.tasks) + 1)),
        ]
    # every engine starts at once and each compiles its model on the first start: with 8
    # tasks on 2 cores that took over the default engine start timeout (600 s)
    start_s = ENGINE_START_S_PER_TASK * max(2, len(taskset.tasks))
    args += ["--mode", "dedicated", "--model-start-wait-s", "1800", "--max-resident-models", str(len(taskset.tasks)),
             "--engine-start-timeout-s", str(start_s)]
    for task in [*taskset.tasks, taskset.added]:  # in this order: the added task starts no engine at first
        args += ["--dedicated-models", str(task.full_model)]
    return args


def engines_expected(mode: str, taskset: TaskSet) -> int:
    if mode == "dedicated":
        return len(taskset.tasks)
    return 1 + (1 if taskset.heads else 0)


async def run_mode(mode: str, taskset: TaskSet, options: CompareOptions, workdir: Path, step: Callable[[str], None]) -> ModeRun:
    run = ModeRun(mode)
    server = ServerProcess(server_args(mode, taskset, options), workdir / f"{mode}-server.log")
    step(f"{mode}: {STEPS[0]}")
    began = time.perf_counter()
    server.start(timeout=600 + ENGINE_START_S_PER_TASK * len(taskset.tasks))
    run.start_to_ready_s = round(time.perf_counter() - began, 2)
    try:
        step(f"{mode}: {STEPS[1]}")
        await warm_up(server.url, taskset)
        step(f"{mode}: {STEPS[2]}")
        await run_workloads(run, server.url, taskset, options.workload)
        step(f"{mode}: {STEPS[3]}")
        run.memory = snapshot(server, engines_expected(mode, taskset))
        step(f"{mode}: {STEPS[4]}")
        await add_task(run, server, taskset)
        run.memory_after_add = snapshot(server, engines_expected(mode, taskset))
    finally:
        step(f"{mode}: {STEPS[5]}")
        server.stop()
    return run


class ProgressSteps:
    """A progress bar over the steps of both modes, started at the first step (the
    preparation before it shows progress bars of its own)."""

    def __init__(self, console, total: int = len(MODES) * len(STEPS) + 1):  # + the training rows
        self.console, self.total = console, total
        self.progress = None

    def __call__(self, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self.progress is None:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(description, total=self.total)
        else:
            self.progress.advance(self.task)
        self.progress.update(self.task, description=description)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=self.total)
            self.progress.stop()


def compare(settings: Settings, options: CompareOptions, step: Callable[[str], None] = lambda _: None) -> dict:
    """Run both modes; returns the report (a dict, see report.build)."""
    from .report import build

    with tempfile.TemporaryDirectory(prefix="adapterserve-compare-") as tmp:
        workdir = Path(tmp)
        taskset, base_path = prepare_tasks(settings, options, workdir)
        runs = {mode: asyncio.run(run_mode(mode, taskset, options, workdir, step)) for mode in MODES}
        training = None
        if options.train_examples:
            from .training import default_data, train_both_ways

            step(f"train {options.train_examples} examples both ways (LoRA, full)")
            training = train_both_ways(base_path, options.train_data or default_data(settings), options.train_examples,
                                       workdir / "training", threads=os.cpu_count() or 1)
        return build(taskset, base_path, runs, options, training)


def parse_bytes(text: str) -> int:
    """'17179869184', '16GiB', '16 GB', '512MiB', '1.5e10' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([a-z]*)", text.strip().lower().replace(" ", ""))
    if match is None or match.group(2) not in units:
        raise ValueError(f"unknown unit in {text!r} (a number, then B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    return int(float(match.group(1)) * units[match.group(2)])
