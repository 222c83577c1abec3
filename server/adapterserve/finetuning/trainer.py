"""The training process of one fine-tuning job: `python -m adapterserve.finetuning.trainer
<spec.json>`, started by the job runner (finetuning/runner.py) at low priority with a
bounded number of threads, so the server keeps serving while it trains.

What it trains follows the job's `kind`: a LoRA adapter with peft on the frozen base
("lora", the loss on the assistant's last answer only, as `adapters build` does:
training/lora.py), a head adapter ("head": a new score layer and a LoRA), or, in dedicated
mode, every weight of the base ("full": a causal LM; "full_head": a sequence classifier),
saved as a full model folder vLLM serves. It saves a checkpoint after every epoch (with
the state a restart resumes from: `resume_from` in the spec), and reports on stdout as JSON lines, which the runner turns into the job's events:
`{"type": "step", ...}`, `{"type": "checkpoint", ...}`, `{"type": "done", ...}` with what the
training cost (trainable parameters and their share of the base, wall time, peak memory,
bytes on disk, the validation loss).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path


FULL_KINDS = ("full", "full_head")  # every weight trained: dedicated mode's jobs
CLASSIFIER_KINDS = ("head", "full_head")
KEPT_CHECKPOINTS = 3  # as OpenAI keeps the last three of a job
STATE_FILE = "trainer_state.pt"


def report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def environment(threads: int) -> dict[str, str]:
    """The trainer process's environment: its threads bounded from the start."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def start_process(spec: dict, folder: Path, new_session: bool = False):
    """The trainer on `spec` in a process of its own (blocking callers: compare, a Ray
    task; the job runner starts it with asyncio), its reports on a text stdout, its log
    in `folder/trainer.log`."""
    import subprocess

    (folder / "spec.json").write_text(json.dumps(spec))
    with (folder / "trainer.log").open("wb") as errors:
        return subprocess.Popen([sys.executable, "-m", "adapterserve.finetuning.trainer", str(folder / "spec.json")],
                                stdout=subprocess.PIPE, stderr=errors, env=environment(spec["threads"]), text=True,
                                start_new_session=new_session)


def reports(lines):
    """The trainer's reports among its stdout's lines (anything else is skipped)."""
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def mean_loss(model, rows, batch_size, pad_id) -> float:
    import torch

    from adapterserve.training.lora import pad_batch

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            input_ids, labels, attention = pad_batch(rows[start:start + batch_size], pad_id)
            losses.append(model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.item())
    model.train()
    return sum(losses) / len(losses) if losses else float("nan")


def chat_model(spec: dict):
    """The base as a causal LM, with a LoRA adapter (or every weight trained for "full");
    each example as (ids, labels) with the loss on the assistant's last answer only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterserve.training.lora import encode_chat_example

    tokenizer = AutoTokenizer.from_pretrained(spec["base_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["base_path"], dtype=torch.float32)
    if spec["kind"] != "full":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=spec["target_modules"],
                            lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model, tokenizer, lambda messages: encode_chat_example(tokenizer, messages)


def head_model(spec: dict):
    """The base as a sequence classifier with a new `score` layer: with a LoRA beside it
    (the score saved whole), as `adapters build` trains heads (training/heads.py), or with
    every weight trained for "full_head"; each example as (ids, label index)."""
    from adapterserve.training.heads import load_classifier

    model, tokenizer = load_classifier(spec["base_path"], spec["labels"])
    if spec["kind"] != "full_head":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=spec["target_modules"],
                            lora_dropout=0.0, task_type="SEQ_CLS", modules_to_save=["score"])
        model = get_peft_model(model, config)
    index = {label: i for i, label in enumerate(spec["labels"])}
    return model, tokenizer, lambda example: (tokenizer(example[0])["input_ids"], index[example[1]])


def save(model, spec: dict, folder: Path) -> None:
    """An adapter folder (LoRA, head), or a full model folder vLLM serves (full kinds)."""
    if spec["kind"] in FULL_KINDS:
        import copy

        from adapterserve.training.merge import save_full_model

        save_full_model(copy.deepcopy(model), spec["base_path"], folder)  # a bf16 copy: training goes on in float32
    else:
        model.save_pretrained(folder, safe_serialization=True)


def train(spec: dict) -> None:
    import torch

    from adapterserve.finetuning.datasets import read_chat_file
    from adapterserve.training.lora import batches, train_step

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model, tokenizer, encode = (head_model if spec["kind"] in CLASSIFIER_KINDS else chat_model)(spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = [encode(example) for example in read_chat_file(spec["training_file"], 1).examples]
    validation = ([encode(example) for example in read_chat_file(spec["validation_file"], 1).examples]
                  if spec.get("validation_file") else [])
    per_epoch = math.ceil(len(rows) / spec["batch_size"])
    steps = per_epoch * spec["n_epochs"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["learning_rate"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    began, tokens, done_steps = time.perf_counter(), 0, 0
    if spec.get("resume_from"):  # a restart: on from the last checkpoint, exactly where it was
        done_steps, tokens = resume(model, optimizer, schedule, Path(spec["resume_from"]))
        report(type="resumed", step=done_steps, total_steps=steps, trained_tokens=tokens)
    for step, batch in enumerate(batches(rows, spec["batch_size"], steps, spec["seed"]), start=1):
        if step <= done_steps:  # the seeded batches are the same again: skip the ones already trained
            continue
        loss, held = train_step(model, batch, tokenizer.pad_token_id, optimizer, schedule)
        tokens += held
        report(type="step", step=step, total_steps=steps, train_loss=round(loss, 4), trained_tokens=tokens)
        if step % per_epoch == 0:
            folder = Path(spec["checkpoints_dir"]) / f"step-{step}"
            save(model, spec, folder)
            save_state(model, optimizer, schedule, step, tokens, folder)
            metrics = {"step": step, "train_loss": round(loss, 4)}
            if validation:
                metrics["valid_loss"] = round(mean_loss(model, validation, spec["batch_size"], tokenizer.pad_token_id), 4)
            report(type="checkpoint", step=step, path=str(folder), metrics=metrics)
            _keep_last_checkpoints(Path(spec["checkpoints_dir"]))
    out = Path(spec["out_dir"])
    save(model, spec, out)
    if spec["kind"] == "head":  # the label names the head answers with
        from adapterserve.registry.limits import LABELS_FILE

        (out / LABELS_FILE).write_text(json.dumps({"labels": spec["labels"]}))
    report(
        type="done", trained_tokens=tokens, trainable_params=trainable, trainable_share=trainable / total,
        train_seconds=round(time.perf_counter() - began, 2), steps=steps,
        peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        bytes_on_disk=sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        valid_loss=round(mean_loss(model, validation, spec["batch_size"], tokenizer.pad_token_id), 4) if validation else None,
    )


def save_state(model, optimizer, schedule, step: int, tokens: int, folder: Path) -> None:
    """What resuming needs beside the checkpoint's weights: the trainable weights in
    float32 (a full model's checkpoint is saved in bf16), the optimizer's and the
    schedule's state, the step, the tokens and the random state. Written to a temporary
    name first: a state file is whole or absent."""
    import torch

    state = {
        "step": step, "tokens": tokens, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "trainable": {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad},
    }
    torch.save(state, folder / f".{STATE_FILE}")
    (folder / f".{STATE_FILE}").rename(folder / STATE_FILE)


def resume(model, optimizer, schedule, folder: Path) -> tuple[int, int]:
    """Load a checkpoint's state (save_state); (steps done, tokens trained)."""
    import torch

    state = torch.load(folder / STATE_FILE, weights_only=False)  # the trainer's own file, in the job's folder
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["tokens"]


def last_resumable(checkpoints_dir: Path) -> Path | None:
    """The last checkpoint with a whole state file (the one a restart resumes from)."""
    steps = sorted((p for p in Path(checkpoints_dir).glob("step-*") if (p / STATE_FILE).is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    return steps[-1] if steps else None


def _keep_last_checkpoints(folder: Path) -> None:
    """Only the last KEPT_CHECKPOINTS folders stay on disk (a full model's is the size of
    the base), and only the last one keeps its state file (a full model's optimizer state
    is twice its float32 weights); every checkpoint's metrics stay listed."""
    import shutil

    steps = sorted(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in steps[:-KEPT_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    for old in steps[-KEPT_CHECKPOINTS:-1]:
        (old / STATE_FILE).unlink(missing_ok=True)


def lowest_priority() -> None:
    """The lowest priority the OS has: Linux's idle class (SCHED_IDLE, its threads too).
    That alone does not keep serving at its speed on 2 cores (0.33 of idle, measured with
    bench/fine_tuning.py, as with `nice 10`): the runner also pauses the trainer while the
    engines have requests (finetuning/serving_first.py)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the lowest nice level instead
        os.nice(19)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("priority", "idle") == "idle":
        lowest_priority()
    try:
        train(spec)
    except Exception as exc:  # the runner fails the job with this reason
        report(type="error", message=f"{type(exc).__name__}: {str(exc)[:500]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
