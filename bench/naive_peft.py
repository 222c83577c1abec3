"""The naive alternative: one transformers + peft model, one request at a time, switching
adapters with set_adapter before each request (what a hand-written server would do)."""

from __future__ import annotations

import time
from pathlib import Path

from adapterserve.compare.workload import PROMPTS


def run_naive(base_path: Path, adapters: dict[str, Path], requests: int, max_tokens: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    tokens = 0
    began = time.perf_counter()
    for i in range(requests):
        model.set_adapter(names[i % len(names)])
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - prompt["input_ids"].shape[1]
    seconds = time.perf_counter() - began
    return {
        "scenario": f"naive transformers+peft, {len(names)} adapters, sequential",
        "requests": requests,
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
    }
