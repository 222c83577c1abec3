"""With the real engine: the fused CPU LoRA path against vLLM's reference path.

- Exactness where it is the point: in float32 on both sides (any CPU serves it), greedy
  output with the fused path equals greedy output with vLLM's reference path token for
  token, for each demo adapter.
- In bfloat16 (what `dtype auto` serves on a CPU with native bf16), the two paths sum in
  different orders and round differently: they must agree up to the first near-tie of the
  reference path (the divergence rule of tests/reference.py).
- Base requests batched with adapters keep the base's output (vLLM 0.32's reference
  applies the last slot's adapter to them).
"""

from __future__ import annotations

import asyncio
import shutil

import openai
import pytest

from adapterserve.server_process import ServerProcess
from tests.integration.conftest import DEMO
from tests.reference import assert_matches, served_greedy

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of Italy?", "Name three colors."]
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory, demo_dir):
    store = tmp_path_factory.mktemp("lora-only")
    for name in DEMO:
        shutil.copytree(demo_dir / name, store / name)
    return store


@pytest.fixture(scope="module")
def path_servers(tmp_path_factory, lora_store):
    """(dtype, fused) -> a client of a server over the demo LoRA adapters, started on first
    use and kept for the module (four engines of ~1.6 GiB: this machine has 24). The two
    paths of a dtype are always compared, so both of its servers start side by side."""
    running: dict[tuple[str, bool], ServerProcess] = {}

    def client(dtype: str, fused: bool) -> openai.OpenAI:
        if (dtype, fused) not in running:
            for path in (True, False):
                flags = ["--no-demo-adapters", "--adapter-dirs", str(lora_store), "--dtype", dtype, "--max-lora-rank", "16"]
                if not path:
                    flags.append("--no-grouped-lora-ops")
                logs = tmp_path_factory.mktemp(f"logs-{dtype}-{'fused' if path else 'reference'}")
                running[(dtype, path)] = ServerProcess(flags, logs / "server.log").launch()  # stopped below either way
            for path in (True, False):
                running[(dtype, path)].wait_healthy()
        return openai.OpenAI(base_url=f"{running[(dtype, fused)].url}/v1", api_key="x", max_retries=0, timeout=300)

    yield client
    for process in running.values():
        process.stop()


def question(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("dtype, name", [(dtype, name) for dtype in DTYPES for name in DEMO])
def test_fused_path_gives_the_reference_path_greedy_output(path_servers, dtype, name):
    for text in QUESTIONS:
        fused = served_greedy(path_servers(dtype, True), name, question(text))
        reference = served_greedy(path_servers(dtype, False), name, question(text))
        if dtype == "float32":
            assert fused.tokens == reference.tokens, (name, text)
        else:
            assert_matches(fused.tokens, reference, 16, f"{name} on {text!r} in {dtype}", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_adapter_changes_the_output_on_both_paths(path_servers, base_path, dtype):
    """The comparison above would also pass if neither path applied the adapter."""
    base = base_path.name
    for fused in (True, False):
        client = path_servers(dtype, fused)
        plain = served_greedy(client, base, question(QUESTIONS[0])).tokens
        assert all(served_greedy(client, name, question(QUESTIONS[0])).tokens != plain for name in DEMO), (dtype, fused)


def test_base_requests_batched_with_adapters_keep_the_base_output(client, async_client, base_name):
    """All 4 slots busy with adapters and base requests in the same batches."""
    alone = served_greedy(client, base_name, question(QUESTIONS[0]))

    async def burst():
        http = async_client()

        async def one(model):
            response = await http.chat.completions.create(
                model=model, messages=question(QUESTIONS[0]), temperature=0, max_tokens=16,
                extra_body={"return_token_ids": True},
            )
            return model, response.choices[0].token_ids

        models = [*DEMO, "random-1", base_name] * 3
        async with http:
            return await asyncio.gather(*(one(m) for m in models))

    for model, tokens in asyncio.run(burst()):
        if model == base_name:
            # batched, the base may round differently in bf16, but only at a near-tie
            assert_matches(tokens, alone, 16, "base batched with adapters")


def test_the_engine_applies_lora_layers_fused(client, server):
    """The greedy tests above ran on the fused path, not on vLLM's wrapper."""
    served_greedy(client, DEMO[0], question(QUESTIONS[0]))  # the wrapper logs at its first LoRA layer
    log = server.log_path.read_text()
    assert "fused CPU LoRA layers: active" in log
    assert "NOT laid out" not in log


def test_the_engine_reports_the_lora_forms_it_measured_on_this_cpu(client, server):
    """The autotuner measured every form at the engine's first LoRA step (or read what this
    CPU measured before), logged it, and /admin/engines shows each size's choice with its
    timings: the fastest form measured there."""
    import time

    import httpx

    from adapterserve.engine_plugins.cpu_lora.punica import FORMS
    from tests.integration.conftest import ADMIN_KEY

    served_greedy(client, DEMO[0], question(QUESTIONS[0]))
    deadline, forms = time.monotonic() + 60, None
    while forms is None and time.monotonic() < deadline:  # the metrics read the workers every 5 s
        engines = httpx.get(f"{server.url}/admin/engines", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).json()
        forms = next(e["lora_forms"] for e in engines["engines"] if e["name"] == "generate")
        time.sleep(0.5)
    assert forms is not None and len(forms) == 1 and set(forms) <= {"bfloat16", "float32"}  # the served dtype
    tuned = next(iter(forms.values()))
    assert tuned["source"] in ("measured", "cached")
    assert {"16x1", "16x2", "1024x1"} <= set(tuned["choices"])  # up to the engine's slots (MAX_LORAS)
    for size, form in tuned["choices"].items():
        assert form in FORMS and tuned["ms"][size][form] == min(tuned["ms"][size].values())
    assert "CPU LoRA forms (" in server.log_path.read_text()


def test_the_engine_processes_and_threads_are_as_the_rules_say(server):
    """On a machine of at most 2 CPUs the model runs in the engine core's process; above, in
    a worker process of its own whose threads leave vLLM's 1 CPU free (hosting/cpu_cores.py)."""
    import os

    from adapterserve.hosting.cpu_cores import ENV_RESERVED, reserved_cpus, worker_process

    log = server.log_path.read_text()
    cores = [p for p in server.descendants() if "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 2, "generate and classify"
    workers = [c for core in cores for c in core.children() if "resource_tracker" not in " ".join(c.cmdline())]
    if not worker_process(None):
        assert workers == [] and "reserve_cpu_num" not in log  # vLLM's OpenMP set-up is the worker's
        return
    assert len(workers) == 2
    expected = reserved_cpus(None)
    if expected is None:  # vLLM's: the operator's variable, or 1 per worker
        expected = int(os.environ.get(ENV_RESERVED, "1"))
    assert f"reserve_cpu_num={expected}" in log
