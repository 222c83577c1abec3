"""adapterserve: one base LLM with many hot-swapped adapters, or every fully fine-tuned
model on its own, behind one OpenAI-style API (see README.md).

Packages: `api` (HTTP endpoints, error rendering), `hosting` (the hosts and engines),
`registry` (adapter stores, validation, snapshots), `metrics`, `training` and `compare`
run in the API process; `engine_plugins` is the code that runs inside vLLM's engine
processes (loaded there by vLLM as plugins). `errors` is the leaf they all raise from.
"""
