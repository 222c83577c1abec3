"""What a process beside the engines costs serving, whatever its priority: base-only
throughput on a shared-mode server at its defaults, idle, then with each of these running
in Linux's idle scheduling class (SCHED_IDLE), each followed by an idle round again:

- a pure Python loop (CPU only),
- a numpy loop over a 256 MB array (memory bandwidth),
- a float32 matmul loop with 1 torch thread (what a trainer does).

    python -m bench.contention [--requests 48] [--concurrency 16] [--max-tokens 32]

Writes bench/results/contention-<cpu>.json, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapterserve.compare.workload import run_workload
from adapterserve.server_process import ServerProcess

from .common import ADMIN, cpu_kind, demo_adapters, machine, write_result

IDLE_CLASS = "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
BURNERS = {
    "python loop": IDLE_CLASS + "while True: pass",
    "numpy memory loop": IDLE_CLASS + "import numpy as np\na = np.ones(64 * 1024 * 1024, dtype=np.float32)\nwhile True: b = a * 2.0",
    "torch matmul loop, 1 thread": IDLE_CLASS + "import torch\ntorch.set_num_threads(1)\na = torch.randn(2048, 2048)\nwhile True: b = a @ a",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    base_path, _ = demo_adapters()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as folder:
        server = ServerProcess(["--admin-api-key", ADMIN], Path(folder) / "server.log").start()
        url = f"{server.url}/v1"

        def measure(label: str) -> None:
            row = asyncio.run(run_workload(url, [base_path.name], args.requests, args.concurrency, args.max_tokens, label)).row()
            rows.append(row)
            print(label, row["tokens_per_second"], row["ttft_p50_ms"], flush=True)

        try:
            asyncio.run(run_workload(url, [base_path.name], 8, 4, 8, "warm-up"))
            measure("idle")
            for name, code in BURNERS.items():
                burner = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
                time.sleep(3)  # past its start
                measure(f"beside a {name} (SCHED_IDLE)")
                burner.kill()
                burner.wait()
                measure("idle again")
        finally:
            server.stop()
    report = {"machine": machine(), "args": vars(args), "rows": rows}
    kind = cpu_kind(report["machine"]).split(" ")[0].lower()
    print(write_result(f"contention-{kind}.json", report))


if __name__ == "__main__":
    main()
