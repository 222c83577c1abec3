"""The training rows of `adapterserve compare`: the same chat data trained both ways on
this machine, a LoRA adapter on the frozen base and every weight of the base, by the same
trainer and defaults fine-tuning jobs use (finetuning/trainer.py, finetuning/defaults.py).
Each way reports its trainable parameters (and their share of the base), wall time, peak
memory, bytes on disk and its loss on held-out examples of the same file.

The data: a chat JSONL (default: the pirate demo recipe's), shuffled with a fixed seed,
then `examples` lines to train on and a quarter as many (at least 8) held out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from adapterserve.finetuning.defaults import DEFAULTS, LORA_DEFAULTS, learning_rate
from adapterserve.finetuning.trainer import reports, start_process

WAYS = {"lora": "LoRA adapter (shared mode)", "full": "full fine-tune (dedicated mode)"}
SEED = 0


def default_data(settings) -> Path:
    return Path(settings.demo_recipes_dir) / "pirate" / "data.jsonl"


def split(data: Path, examples: int, folder: Path) -> tuple[Path, Path, int]:
    """(training file, validation file, held-out count) from the data file's lines."""
    lines = [line for line in Path(data).read_text().splitlines() if line.strip()]
    held_out = max(8, examples // 4)
    if len(lines) < examples + held_out:
        raise ValueError(f"{data} has {len(lines)} examples; {examples} to train on and {held_out} held out need more")
    random.Random(SEED).shuffle(lines)
    training, validation = folder / "train.jsonl", folder / "validation.jsonl"
    training.write_text("\n".join(lines[:examples]) + "\n")
    validation.write_text("\n".join(lines[examples:examples + held_out]) + "\n")
    return training, validation, held_out


def spec(way: str, base_path: Path, training: Path, validation: Path, folder: Path, threads: int) -> dict:
    return {
        "kind": way, "base_path": str(base_path), "training_file": str(training), "validation_file": str(validation),
        "out_dir": str(folder / "out"), "checkpoints_dir": str(folder / "checkpoints"), "threads": threads, "priority": "normal",
        "n_epochs": DEFAULTS["n_epochs"], "batch_size": DEFAULTS["batch_size"], "seed": SEED,
        "learning_rate": learning_rate(way == "full"), "labels": [], **LORA_DEFAULTS,
    }


def run_trainer(trainer_spec: dict, folder: Path, on_step: Callable[[int, int], None] = lambda step, total: None) -> dict:
    """Run the jobs' trainer on a spec; its final report (what the training cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    process = start_process(trainer_spec, folder)
    last: dict = {}
    for last in reports(process.stdout):
        if last.get("type") == "step":
            on_step(last["step"], last["total_steps"])
    process.wait()
    if process.returncode != 0 or last.get("type") != "done":
        reason = last.get("message") or (folder / "trainer.log").read_text(errors="replace")[-500:]
        raise RuntimeError(f"training failed: {reason}")
    return last


def train_both_ways(base_path: Path, data: Path, examples: int, folder: Path, threads: int,
                    on_step: Callable[[str, int, int], None] = lambda way, step, total: None) -> dict:
    """The training rows: each way's costs, with what was trained on."""
    folder.mkdir(parents=True, exist_ok=True)
    training, validation, held_out = split(data, examples, folder)
    ways = {}
    for way in WAYS:
        done = run_trainer(spec(way, base_path, training, validation, folder / way, threads), folder / way,
                           lambda step, total, way=way: on_step(way, step, total))
        ways[way] = {k: done[k] for k in ("trainable_params", "trainable_share", "train_seconds", "peak_memory_bytes",
                                          "bytes_on_disk", "valid_loss", "steps", "trained_tokens")}
    return {"data": str(data), "examples": examples, "held_out": held_out, "threads": threads,
            "n_epochs": DEFAULTS["n_epochs"], "batch_size": DEFAULTS["batch_size"],
            "learning_rates": {way: learning_rate(way == "full") for way in WAYS}, "ways": ways}
