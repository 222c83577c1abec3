"""Fine-tuning on this machine:

- training rows: the same chat data (the pirate demo recipe's) trained both ways by the
  jobs' trainer, a LoRA adapter and every weight (compare/training.py): trainable
  parameters, wall time, peak memory, bytes on disk, held-out loss;
- serving while a job runs: the chat workload (base only, then 3 adapters mixed) on a
  shared-mode server at its defaults, idle and while a fine-tuning job trains (created
  through the API, cancelled after the workload), in A B B A order over the rounds.

    python -m bench.fine_tuning [--examples 64] [--threads 2] [--rounds 2] [--skip-training-rows] [--skip-serving]

Writes bench/results/fine_tuning-<cpu>.json, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

import openai

from adapterserve.compare.training import default_data, train_both_ways
from adapterserve.compare.workload import run_workload
from adapterserve.config import load_settings
from adapterserve.server_process import ServerProcess

from .common import ADMIN, DEMO, cpu_kind, demo_adapters, machine, write_result

JOB_EXAMPLES = 64
JOB_EPOCHS = 50  # longer than any workload round: the job is cancelled after it


def training_rows(base_path: Path, examples: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-training-") as folder:
        return train_both_ways(base_path, default_data(load_settings()), examples, Path(folder), threads,
                               lambda way, step, total: print(f"{way}: step {step}/{total}", end="\r", flush=True))


def wait_for(client, job_id: str, statuses: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.fine_tuning.jobs.retrieve(job_id).status
        if status in statuses:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not in {statuses}")


async def scenarios(url: str, base: str, args) -> list[dict]:
    rows = []
    for scenario, models in (("base only", [base]), ("3 adapters", DEMO)):
        result = await run_workload(url, models, args.requests, args.concurrency, args.max_tokens, scenario)
        rows.append(result.row())
    return rows


def serving_while_training(base: str, args) -> dict:
    data = "".join(line + "\n" for line in default_data(load_settings()).read_text().splitlines()[:JOB_EXAMPLES])
    with tempfile.TemporaryDirectory(prefix="bench-fine-tuning-") as folder:
        server = ServerProcess(["--admin-api-key", ADMIN, "--fine-tuning-dir", folder], Path(folder) / "server.log").start()
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
            file = client.files.create(file=("pirate.jsonl", io.BytesIO(data.encode())), purpose="fine-tune")
            asyncio.run(run_workload(f"{server.url}/v1", [base, *DEMO], 8, 4, 8, "warm-up"))
            results: dict[str, list[dict]] = {"idle": [], "training": []}
            order = [state for _ in range(args.rounds) for state in ("idle", "training", "training", "idle")][: 2 * args.rounds]
            trained = []  # the job's training tokens per second while the workload ran
            for state in order:
                job = None
                if state == "training":
                    job = client.fine_tuning.jobs.create(
                        model=base, training_file=file.id, suffix="bench",
                        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": JOB_EPOCHS}}})
                    wait_for(client, job.id, {"running"})
                    time.sleep(5)  # past the trainer's start (loading the base)
                    before = client.fine_tuning.jobs.retrieve(job.id).trained_tokens or 0
                began = time.perf_counter()
                rows = asyncio.run(scenarios(f"{server.url}/v1", base, args))
                seconds = time.perf_counter() - began
                results[state] += rows
                print(state, rows, flush=True)
                if job is not None:
                    trained.append(((client.fine_tuning.jobs.retrieve(job.id).trained_tokens or 0) - before) / seconds)
                    client.fine_tuning.jobs.cancel(job.id)
                    wait_for(client, job.id, {"cancelled"})
        finally:
            server.stop()

    def pooled(state: str, scenario: str) -> dict:
        rows = [r for r in results[state] if r["scenario"] == scenario]
        return {key: round(statistics.mean(r[key] for r in rows), 1) for key in ("tokens_per_second", "ttft_p50_ms", "ttft_p99_ms")}

    table = {scenario: {state: pooled(state, scenario) for state in results} for scenario in ("base only", "3 adapters")}
    for scenario, states in table.items():
        states["training_over_idle"] = round(states["training"]["tokens_per_second"] / states["idle"]["tokens_per_second"], 3)
    return {"scenarios": table, "job_tokens_per_second_while_serving": round(statistics.mean(trained), 1) if trained else None,
            "rounds": results, "job": {"examples": JOB_EXAMPLES, "threads": load_settings().fine_tuning_threads}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64, help="examples for the training rows")
    parser.add_argument("--threads", type=int, default=2, help="trainer threads for the training rows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-training-rows", action="store_true")
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--out", default=None, help="result file name (default: fine_tuning-<cpu>.json)")
    args = parser.parse_args()
    base_path, _ = demo_adapters()
    report = {"machine": machine(), "args": vars(args)}
    if not args.skip_training_rows:
        report["training"] = training_rows(base_path, args.examples, args.threads)
        print(report["training"], flush=True)
    if not args.skip_serving:
        report["serving"] = serving_while_training(base_path.name, args)
        print(report["serving"]["scenarios"])
    kind = cpu_kind(report["machine"]).split(" ")[0].lower()
    print(write_result(args.out or f"fine_tuning-{kind}.json", report))


if __name__ == "__main__":
    main()
