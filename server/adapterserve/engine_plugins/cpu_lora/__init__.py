"""Fast multi-LoRA for vLLM's CPU backend (copy-free ops, fused layer slots, a punica wrapper
that applies a layer per call), installed as a vLLM plugin."""
