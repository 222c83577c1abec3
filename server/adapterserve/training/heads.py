"""Training a head adapter: a new classification layer (`score`) over the frozen base,
with a small LoRA beside it, saved as a PEFT SEQ_CLS adapter that vLLM's pooling engine
serves per request. The label names go to labels.json in the adapter folder."""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from pathlib import Path

from rich.progress import Progress

from adapterserve.registry.validation import LABELS_FILE

from .lora import progress_bar
from .recipes import Recipe


def load_classifier(base_path: Path, labels: list[str]):
    """The base as a sequence classifier with a fresh `score` layer (transformers)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=torch.float32,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # pools at the last non-pad token
    return model, tokenizer


def train_head(base_path: Path, recipe: Recipe, out_dir: Path, progress: Progress | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    if len(recipe.labels) < 2:
        raise ValueError(f"head recipe {recipe.name} needs at least two labels")
    torch.manual_seed(recipe.seed)
    model, tokenizer = load_classifier(base_path, recipe.labels)
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        lora_dropout=recipe.dropout,
        target_modules=recipe.target_modules,
        modules_to_save=["score"],
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    label_ids = {label: i for i, label in enumerate(recipe.labels)}
    rows = [(ex["text"], label_ids[ex["label"]]) for ex in recipe.examples()]
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate)
    model.train()
    began, loss_value, correct, seen = time.perf_counter(), float("nan"), 0, 0
    own = progress is None
    progress = progress or progress_bar()
    with progress if own else nullcontext():
        task = progress.add_task(f"train {recipe.name}", total=recipe.steps, info="")
        for _ in range(recipe.steps):
            batch = rng.sample(rows, recipe.batch_size)
            encoded = tokenizer([text for text, _ in batch], return_tensors="pt", padding=True)
            labels = torch.tensor([label for _, label in batch])
            out = model(**encoded, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_value = out.loss.item()
            correct += int((out.logits.argmax(-1) == labels).sum())
            seen += len(batch)
            progress.update(task, advance=1, info=f"loss {loss_value:.3f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / LABELS_FILE).write_text(json.dumps({"labels": recipe.labels}))
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "final_loss": loss_value,
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": time.perf_counter() - began,
        "examples": len(rows),
    }
