"""Code that runs inside vLLM's own processes (engine core, workers), loaded there by vLLM
through the `vllm.general_plugins` entry points: `cpu_lora` (the fused CPU LoRA path and
the containment guards), `worker_report` (memory by component, read from the worker's
live tensors) and `heap` (free heap pages given back, here and in the API process).
Nothing here imports the API process's modules."""
