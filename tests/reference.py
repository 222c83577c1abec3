"""Reference greedy decoding with transformers (+ peft), and the near-tie comparison.

The weights are stored in bf16; the server runs them with vLLM's kernels (in float32 on a
CPU without native bf16, else bf16) and the reference in float32 with transformers. Greedy tokens must agree; where they first differ,
the reference's two best logits at that step must be a near-tie, or the check fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Logit gap under which two candidates count as tied: bf16 weights and different kernels
# move logits by a few tenths at most for this model (measured: < 0.3).
NEAR_TIE = 0.5


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


def assert_matches(server_tokens: list[int], reference: Greedy, steps: int, what: str) -> None:
    """Equal up to `steps` tokens, or the first difference sits on a near-tie."""
    for i, expected in enumerate(reference.tokens[:steps]):
        if i >= len(server_tokens):
            raise AssertionError(f"{what}: server stopped after {i} tokens, reference has {reference.tokens[:steps]}")
        if server_tokens[i] != expected:
            gap = reference.gaps[i]
            assert gap < NEAR_TIE, (
                f"{what}: token {i} differs (server {server_tokens[i]}, reference {expected}) "
                f"and the reference's top-2 logit gap {gap:.3f} is not a near-tie"
            )
            return
