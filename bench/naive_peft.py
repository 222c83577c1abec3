"""The naive alternative: one transformers + peft model, one request at a time, switching
adapters with set_adapter before each request (what a hand-written server would do)."""

from __future__ import annotations

import time
from pathlib import Path

from adapterserve.compare.workload import PROMPTS


def run_naive(base_path: Path, adapters: dict[str, Path], requests: int, max_tokens: int, dtype: str = "float32") -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, dtype))
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
        "scenario": f"naive transformers+peft, {len(names)} adapters, sequential, {dtype}",
        "requests": requests,
        "output_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
    }


def main() -> None:
    """`python -m bench.naive_peft`: the naive server over N demo tasks (copies of the demo
    adapters under distinct names, as `adapterserve compare --tasks N --kind lora` serves
    them), recorded with the CPU; compare its tokens/s with compare's shared figure."""
    import argparse
    import tempfile

    from bench.common import cpu_kind, demo_adapters, machine, make_store, write_result

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="one at a time (48 x 64 tokens would take ~6 min)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="transformers' default on the CPU; bfloat16 to compare")
    parser.add_argument("--out", default=None, help="file name under bench/results")
    args = parser.parse_args()
    base, demo = demo_adapters()
    with tempfile.TemporaryDirectory() as scratch:
        names = make_store(demo, Path(scratch), args.tasks)
        result = run_naive(base, {name: Path(scratch) / name for name in names}, args.requests, args.max_tokens, args.dtype)
    record = machine()
    report = {"machine": record, "command": "python -m bench.naive_peft " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None), "result": result}
    print(result)
    kind = cpu_kind(record).split()[0].lower()
    print("written to", write_result(args.out or f"naive_peft-{args.tasks}-{kind}-{args.dtype}.json", report))


if __name__ == "__main__":
    main()
