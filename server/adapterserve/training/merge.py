"""Merging adapters into full fine-tuned models: the full-fine-tuning counterparts of the
adapter tasks, for the dedicated mode. A LoRA adapter becomes a causal LM folder (peft's
merge_and_unload, bf16 safetensors, tokenizer, chat template, generation config); a head
adapter becomes a sequence-classification model folder. They keep the adapters' names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from adapterserve.registry.records import AdapterRecord

MERGE_INFO = "adapterserve-merge.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json")


def merged_store(cache_dir: Path, base_path: Path) -> Path:
    """Where the merged models of the adapters over this base go."""
    return Path(cache_dir) / "merged" / Path(base_path).name


def is_merged(folder: Path, record: AdapterRecord) -> bool:
    """Up to date: merged from this very adapter file (by size and modification time)."""
    info = folder / MERGE_INFO
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("source") == _source_stamp(record)
    except ValueError:
        return False


def _source_stamp(record: AdapterRecord) -> str:
    weights = record.path / "adapter_model.safetensors"
    stat = weights.stat()
    return f"{record.path}:{stat.st_size}:{stat.st_mtime_ns}"


def merge_adapter(base_path: Path, record: AdapterRecord, out_dir: Path) -> Path:
    """Write the full model for one adapter; returns its folder."""
    import torch
    from peft import PeftModel

    staging = out_dir.parent / f".merging-{out_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    if record.kind == "head":
        from .heads import load_classifier

        model, _ = load_classifier(base_path, record.labels)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, record.path).merge_and_unload()
    save_full_model(merged, base_path, staging)
    (staging / MERGE_INFO).write_text(json.dumps({"source": _source_stamp(record), "kind": record.kind, "labels": record.labels}))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def save_full_model(model, base_path: Path, folder: Path) -> None:
    """A full model folder vLLM serves: bf16 safetensors, with the base's tokenizer, chat
    template and generation config (what merging and a full fine-tuning job both write)."""
    import torch

    model = model.to(torch.bfloat16)
    if getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        # transformers refuses to save greedy defaults (temperature 0); the base's own
        # generation_config.json is copied over it below.
        model.generation_config = GenerationConfig()
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(base_path) / name).is_file():
            shutil.copy(Path(base_path) / name, Path(folder) / name)


def merge_adapters(base_path: Path, records: list[AdapterRecord], store: Path, force: bool = False) -> dict[str, Path]:
    """Merge each adapter that has no up-to-date merged model yet, with a progress bar."""
    from .lora import progress_bar

    store.mkdir(parents=True, exist_ok=True)
    todo = [r for r in records if force or not is_merged(store / r.name, r)]
    if todo:
        with progress_bar() as progress:
            task = progress.add_task("merge", total=len(todo), info="")
            for record in todo:
                progress.update(task, info=record.name)
                merge_adapter(base_path, record, store / record.name)
                progress.update(task, advance=1)
    return {r.name: store / r.name for r in records}
