"""Hosting cost: the memory the running mode uses for its tasks, and what the other mode
would need for the same tasks, derived from the engines' measured figures.

The derivation (also in docs/metrics.md):

- An engine without LoRA support costs what a measured engine of the same runner
  (generate or pooling) costs minus its LoRA state: its preallocated slots and the
  adapters in its CPU cache. In shared mode that is `USS - slots - cached adapters` of
  the engine over the base; in dedicated mode, the mean USS of the resident engines of
  that runner (they have no LoRA state).
- Dedicated mode for N tasks = one such engine per task (a fine-tuned model has the
  base's architecture, so the same weights, KV cache and runtime).
- Shared mode for N tasks = one such engine per runner the tasks need (generate for
  LoRA tasks, pooling for head tasks) + that engine's LoRA slots + every task's adapter
  weights as the engine holds them (all adapters resident in the CPU cache).

In shared mode the slots are measured; in dedicated mode they are estimated from the
model's weight shapes (vLLM's layout: an A and a B matrix of `max_lora_rank` per slot for
every linear layer, and for the tied output embedding once more), which agrees with the
measured figure within 0.1% for SmolLM2 (an integration test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterserve.registry import kinds

GENERATE, POOLING = "generate", "pooling"


@dataclass
class Task:
    """One task as both modes would host it."""

    name: str
    kind: str  # "lora", "head" (shared mode) or "full" (dedicated mode; "head" for classifiers)
    adapter_bytes: int  # the adapter's weights in the engine's dtype


def runner_of(kind: str) -> str:
    return kinds.of(kind).runner


def dedicated_bytes(tasks: list[Task], engine_bytes: dict[str, int]) -> int:
    """One engine per task; `engine_bytes` is a LoRA-free engine's cost per runner."""
    return sum(engine_bytes[runner_of(t.kind)] for t in tasks)


def shared_bytes(tasks: list[Task], engine_bytes: dict[str, int], slot_bytes: dict[str, int]) -> int:
    """One engine per runner the tasks need (the generate one always: it serves the base),
    its LoRA slots, and every adapter's weights."""
    runners = {GENERATE} | {runner_of(t.kind) for t in tasks}
    return sum(engine_bytes[r] + slot_bytes.get(r, 0) for r in runners) + sum(t.adapter_bytes for t in tasks)


def lora_slot_estimate(shapes: dict[str, tuple[int, ...]], tied_embeddings: bool, max_loras: int, max_rank: int, element_bytes: int) -> int:
    """vLLM's preallocated LoRA slots for a model with these weight shapes: every 2-D
    weight (linear layers, embedding) gets A and B of `max_rank`, per slot."""
    per_rank = sum(shape[0] + shape[1] for shape in shapes.values() if len(shape) == 2)
    if tied_embeddings:  # the output layer shares the embedding's weight but has slots of its own
        per_rank += sum(s[0] + s[1] for name, s in shapes.items() if name.endswith("embed_tokens.weight"))
    return max_loras * max_rank * per_rank * element_bytes
