"""Reference greedy decoding, and the divergence rule that compares greedy outputs.

Two kinds of reference:
- transformers (+ peft) in float32 (`load_reference`, `greedy`);
- another server, or the same server under other batching, asked for its top-2 logprobs
  at every step (`served_greedy`): the gap between them is the logit gap (a log-softmax
  only shifts logits).

The rule (`assert_matches`): greedy tokens agree; where they first differ, the
reference's two best logits at that step must be a near-tie for the served dtype, or the
check fails. A wrong adapter, a missing LoRA delta or a leak between slots moves the
output at a step where one token clearly wins, so it still fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Logit gap under which two candidates count as tied, by the dtype the server computes in.
# float32: bf16-stored weights and different kernels move logits by a few tenths at most
# for this model (measured: < 0.3). bfloat16: activations keep 8 bits of mantissa, so
# every matmul rounds at ~0.4% and a different summation order (batch shape, fused versus
# vLLM's LoRA path) moves this model's logits (magnitude ~10-30) by up to ~1 (measured on
# an AVX512-bf16 Xeon: divergences at gaps 0.12-0.75, see tests/integration/test_cpu_lora.py).
NEAR_TIE = {"float32": 0.5, "bfloat16": 1.25}


def served_dtype() -> str:
    """The dtype the server computes in with the default settings on this machine."""
    from adapterserve.config import load_settings
    from adapterserve.dtypes import resolve_dtype

    return resolve_dtype(load_settings().dtype)


def near_tie(dtype: str | None = None) -> float:
    return NEAR_TIE[dtype or served_dtype()]


@dataclass
class Greedy:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each step


def load_reference(base_path, adapter_path=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    return model.eval()


@torch.no_grad()
def greedy(model, prompt_ids: list[int], steps: int, eos_id: int) -> Greedy:
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True)
    tokens, gaps = [], []
    for _ in range(steps):
        logits = out.logits[0, -1].float()
        top = logits.topk(2)
        token = int(top.indices[0])
        tokens.append(token)
        gaps.append(float(top.values[0] - top.values[1]))
        if token == eos_id:
            break
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return Greedy(tokens, gaps)


def greedy_request(model: str, messages: list[dict], max_tokens: int) -> dict:
    """The chat request whose answer `served_greedy` reads (also for async clients)."""
    return dict(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens,
        logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True},
    )


def greedy_of(response) -> Greedy:
    """Tokens and top-2 logprob gaps of a chat response to `greedy_request`."""
    choice = response.choices[0]
    gaps = []
    for step in choice.logprobs.content:
        top = sorted((c.logprob for c in step.top_logprobs), reverse=True)
        gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
    return Greedy(list(choice.token_ids), gaps)


def served_greedy(client, model: str, messages: list[dict], max_tokens: int = 16) -> Greedy:
    return greedy_of(client.chat.completions.create(**greedy_request(model, messages, max_tokens)))


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_matches(server_tokens: list[int], reference: Greedy, steps: int, what: str, dtype: str | None = None) -> None:
    """Equal up to `steps` tokens, or the first difference sits on a near-tie of the
    reference for the served dtype."""
    tie = near_tie(dtype)
    for i, expected in enumerate(reference.tokens[:steps]):
        if i >= len(server_tokens):
            raise AssertionError(f"{what}: server stopped after {i} tokens, reference has {reference.tokens[:steps]}")
        if server_tokens[i] != expected:
            gap = reference.gaps[i]
            assert gap < tie, (
                f"{what}: token {i} differs (server {server_tokens[i]}, reference {expected}) "
                f"and the reference's top-2 logit gap {gap:.3f} is not a near-tie (< {tie} in {dtype or served_dtype()})"
            )
            return
