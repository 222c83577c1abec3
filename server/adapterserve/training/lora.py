"""Training a LoRA adapter with peft on the frozen base (seeded, reproducible).

The loss covers the assistant's answer only: the prompt, rendered with the base's own
chat template exactly as the server renders it, is masked out.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .recipes import Recipe

IGNORE = -100  # label value the loss skips


def encode_chat_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only the last answer."""
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if hasattr(prompt_ids, "input_ids"):  # transformers may answer with a BatchEncoding
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently inside the conversation")
    # The template ends the answer with '<|im_end|>\n'; the model must learn to stop at EOS.
    answer = full_ids[len(prompt_ids):]
    if tokenizer.eos_token_id in answer:
        answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
    ids = prompt_ids + answer
    return ids, [IGNORE] * len(prompt_ids) + answer


def pad_batch(rows: list[tuple[list[int], list[int] | int]], pad_id: int):
    """Right-padded ids, labels and attention mask. A row's labels are token labels (a
    causal LM), or one label index (a sequence classifier: labels of shape (rows,))."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        if not isinstance(lab, int):
            labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    if rows and isinstance(rows[0][1], int):
        labels = torch.tensor([lab for _, lab in rows], dtype=torch.long)
    return input_ids, labels, attention


def batches(rows: list, batch_size: int, steps: int, seed: int):
    """`steps` batches, reshuffling every epoch with a seeded generator."""
    order_rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(rows)))
            order_rng.shuffle(epoch)
            order += epoch
        picked, order = order[:batch_size], order[batch_size:]
        yield [rows[i] for i in picked]


def train_step(model, batch: list, pad_id: int, optimizer, schedule) -> tuple[float, int]:
    """One optimizer step over `batch`: (its loss, the tokens it held)."""
    input_ids, labels, attention = pad_batch(batch, pad_id)
    loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    loss.backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    return loss.item(), int(attention.sum())


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def train_lora(base_path: Path, recipe: Recipe, out_dir: Path, progress: Progress | None = None) -> dict:
    """Train `recipe` over the base at `base_path`; save the PEFT folder to `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=recipe.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    rows = [encode_chat_example(tokenizer, ex["messages"]) for ex in recipe.examples()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / recipe.steps)
    model.train()
    began, loss_value = time.perf_counter(), float("nan")
    own = progress is None
    progress = progress or progress_bar()
    with progress if own else nullcontext():
        task = progress.add_task(f"train {recipe.name}", total=recipe.steps, info="")
        for batch in batches(rows, recipe.batch_size, recipe.steps, recipe.seed):
            loss_value, _ = train_step(model, batch, tokenizer.pad_token_id, optimizer, schedule)
            progress.update(task, advance=1, info=f"loss {loss_value:.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "final_loss": loss_value,
        "train_seconds": time.perf_counter() - began,
        "examples": len(rows),
    }
