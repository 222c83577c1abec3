"""Grouped LoRA operations for vLLM's CPU backend, installed as a vLLM plugin."""
