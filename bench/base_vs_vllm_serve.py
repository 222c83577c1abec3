"""Base-only throughput: `adapterserve serve` at its defaults versus `vllm serve` at vLLM's
defaults on the same base (issue 19: adapterserve must not cost base-only traffic
anything), `vllm serve --enable-lora` with adapterserve's slot flags, which separates the cost of
having LoRA enabled from the cost of adapterserve's own layer, and `vllm serve
--enforce-eager`, which separates the gain of compiled execution. Reproduce with:

    .venv/bin/python bench/base_vs_vllm_serve.py [--rounds 2 --requests 48 --concurrency 16 --max-tokens 32] [--out NAME.json]

vLLM's server runs as `python -m vllm.entrypoints.openai.api_server --model <base>` with
only the KV cache size given (adapterserve's 256 MiB: memory, not speed; vLLM's CPU default
would take 4 GiB); everything else is vLLM's default (its dtype auto, compiled execution,
its max_num_seqs); adapterserve's vLLM plugin is switched off in its processes
(`ADAPTERSERVE_GROUPED_LORA=0`), so `--enable-lora` is vLLM's own CPU LoRA path, eager as
vLLM makes it. adapterserve runs as `adapterserve serve` (demo adapters registered, dtype
auto as measured per CPU, compiled with LoRA enabled). A compiled server's first start of
a configuration compiles (~1-2 min per engine on 2 CPUs); throughput is measured once it
is up. The servers run one after the other, freshly
started, in the order A B C D, D C B A per round, so a drift of the machine weighs on all.
Writes bench/results/base_vs_vllm_serve.json (with the CPU) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_rank_fit import machine  # noqa: E402
from vllm_serve_overhead import measure  # noqa: E402

from adapterserve.config import load_settings  # noqa: E402
from adapterserve.models import resolve_base_model  # noqa: E402
from adapterserve.process import ServerProcess  # noqa: E402

KV_BYTES = str(256 * 2**20)


def servers(base: Path, log_dir: Path) -> dict[str, callable]:
    """label -> a function making that server (each run starts a fresh one)."""
    vllm = ("vllm.entrypoints.openai.api_server",)
    common = ["--host", "127.0.0.1", "--model", str(base), "--served-model-name", base.name, "--kv-cache-memory-bytes", KV_BYTES]
    own = {"ADAPTERSERVE_GROUPED_LORA": "0"}  # vLLM as shipped (the plugin loads in every vLLM process)
    return {
        "vllm serve": lambda: ServerProcess(common, log_dir / "vllm.log", own, entry=vllm),
        # what compiled execution gives vLLM here; with LoRA enabled its CPU platform turns
        # compilation off (vllm/platforms/cpu.py)
        "vllm serve --enforce-eager": lambda: ServerProcess([*common, "--enforce-eager"], log_dir / "vllm-eager.log", own, entry=vllm),
        "vllm serve --enable-lora": lambda: ServerProcess(
            [*common, "--enable-lora", "--max-loras", "16", "--max-lora-rank", "8"], log_dir / "vllm-lora.log", own, entry=vllm
        ),
        "adapterserve serve": lambda: ServerProcess([], log_dir / "adapterserve.log"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2, help="rounds of A B C C B A")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--only", nargs="+", help="labels to run (default: all)")
    parser.add_argument("--out", default="base_vs_vllm_serve.json", help="file name under bench/results")
    args = parser.parse_args()

    base = resolve_base_model(None, load_settings().models_dir)
    with tempfile.TemporaryDirectory() as tmp:
        makers = servers(base, Path(tmp))
        labels = args.only or list(makers)
        results = {label: [] for label in labels}
        for _ in range(args.rounds):
            for label in [*labels, *labels[::-1]]:
                results[label].append(await measure(makers[label](), [base.name], args, f"{label} #{len(results[label]) + 1}"))
    mean = {label: round(statistics.mean(r["tokens_per_second"] for r in rows), 1) for label, rows in results.items()}
    report = {"machine": machine(), "workload": vars(args), "results": results, "mean_tokens_per_second": mean}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}")
    print("| server | tok/s per run | mean tok/s | vs vllm serve | TTFT p50 ms per run |\n|---|---|---|---|---|")
    reference = mean.get("vllm serve")
    for label, rows in results.items():
        ratio = f"{mean[label] / reference:.2f}" if reference else ""
        print(f"| {label} | {', '.join(str(r['tokens_per_second']) for r in rows)} | {mean[label]} | {ratio} | {', '.join(str(r['ttft_p50_ms']) for r in rows)} |")


if __name__ == "__main__":
    asyncio.run(main())
