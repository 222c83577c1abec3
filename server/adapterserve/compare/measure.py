"""One mode under measurement: start its server, run the workload, read the memory of each
of its processes, and add one more task while it serves.

Memory is each process's unique set size (USS, psutil): what the process alone holds, so
the sum over the server's processes is what hosting costs, with no shared page counted
twice. The server's own /metrics tells which engine each process belongs to and what the
engine holds by component."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.server_process import ServerProcess

from .tasks import ADDED_TASK, TaskSet
from .workload import run_classify_workload, run_workload

ADMIN_KEY = "compare-admin"


@dataclass
class Workload:
    requests: int = 48
    concurrency: int = 16
    max_tokens: int = 64
    classify_requests: int = 64


@dataclass
class Snapshot:
    """The server's memory at one moment, by process and by engine."""

    processes: list[dict]  # pid, engine ("api", an engine name, or "other"), process, uss_bytes
    components: dict[str, dict[str, int]]  # engine -> component -> bytes, as the engine reports

    @property
    def total_bytes(self) -> int:
        return sum(p["uss_bytes"] for p in self.processes)

    def engine_bytes(self) -> dict[str, int]:
        """USS per engine (its core, and its worker where it has one), in the order the engines appear."""
        engines: dict[str, int] = {}
        for p in self.processes:
            if p["engine"] not in ("api", "other"):
                engines[p["engine"]] = engines.get(p["engine"], 0) + p["uss_bytes"]
        return engines

    @property
    def outside_engines_bytes(self) -> int:
        """The API process and any helper process: paid once per server, whatever the mode."""
        return self.total_bytes - sum(self.engine_bytes().values())

    def row(self) -> dict:
        return {
            "total_bytes": self.total_bytes, "engines": self.engine_bytes(),
            "outside_engines_bytes": self.outside_engines_bytes,
            "processes": self.processes, "components": self.components,
        }


@dataclass
class ModeRun:
    mode: str
    start_to_ready_s: float = 0.0
    generation: dict | None = None
    classification: dict | None = None
    memory: Snapshot | None = None
    add_task: dict = field(default_factory=dict)
    memory_after_add: Snapshot | None = None


def scrape(url: str) -> dict[str, list]:
    """The server's /metrics as {family name: samples}."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def snapshot(server: ServerProcess, engines: int, wait_s: float = 30.0) -> Snapshot:
    """USS of every process of the server, each tagged with its engine. Waits (bounded)
    until the metrics report `engines` engines: they are read in the background."""
    deadline = time.monotonic() + wait_s
    while True:
        families = scrape(server.url)
        owners = {
            int(s.labels["pid"]): (s.labels["engine"], s.labels["process"])
            for s in families.get("adapterserve_engine_process_memory_bytes", [])
        }
        if len({engine for engine, _ in owners.values()}) >= engines or time.monotonic() > deadline:
            break
        time.sleep(1)
    components: dict[str, dict[str, int]] = {}
    for sample in families.get("adapterserve_engine_memory_bytes", []):
        components.setdefault(sample.labels["engine"], {})[sample.labels["component"]] = int(sample.value)
    root = psutil.Process(server.process.pid)
    processes = []
    for process in [root, *server.descendants()]:
        try:
            uss = process.memory_full_info().uss
        except psutil.NoSuchProcess:
            continue
        engine, role = owners.get(process.pid, ("api", "api") if process is root else ("other", process.name()))
        processes.append({"pid": process.pid, "engine": engine, "process": role, "uss_bytes": uss})
    return Snapshot(processes, components)


def swap_seconds(url: str) -> float | None:
    samples = scrape(url).get("adapterserve_model_swap_seconds", [])
    total = [s.value for s in samples if s.name.endswith("_sum")]
    return sum(total) if total else None


async def first_response(url: str, model: str, kind: str) -> float:
    """Seconds until the first complete answer of `model` (1 token, or one label)."""
    import openai

    began = time.perf_counter()
    if kind == "head":
        async with httpx.AsyncClient(timeout=900) as http:
            (await http.post(f"{url}/v1/classify", json={"model": model, "input": "A first request."})).raise_for_status()
    else:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900) as client:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=1)
    return time.perf_counter() - began


async def warm_up(url: str, taskset: TaskSet) -> None:
    """One request per task, so each engine and adapter has served once before timing."""
    for task in taskset.tasks:
        await first_response(url, task.name, task.kind)


async def run_workloads(run: ModeRun, url: str, taskset: TaskSet, workload: Workload) -> None:
    if taskset.generative:
        result = await run_workload(
            f"{url}/v1", taskset.generative, workload.requests, workload.concurrency, workload.max_tokens, run.mode
        )
        run.generation = result.row()
    if taskset.heads:
        result = await run_classify_workload(f"{url}/v1", taskset.heads, workload.classify_requests, workload.concurrency, run.mode)
        run.classification = result.row()


async def add_task(run: ModeRun, server: ServerProcess, taskset: TaskSet) -> None:
    """Time until one more task is servable, and until its first answer.

    Shared mode: put the adapter folder in the store and load it (the admin API; it
    returns once the engine holds the adapter), then its first request. Dedicated mode:
    the first request for a model that has no engine, which starts one (swapping the least
    recently used out, as the resident limit is reached); servable is the server's own
    swap time (adapterserve_model_swap_seconds)."""
    kind = taskset.added.kind
    if run.mode == "shared":
        began = time.perf_counter()
        shutil.copytree(taskset.added_source, taskset.adapter_store / ADDED_TASK)
        copied = time.perf_counter()
        response = httpx.post(
            f"{server.url}/admin/adapters/{ADDED_TASK}/load", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=300
        )
        response.raise_for_status()
        ready = time.perf_counter() - began
        first = await first_response(server.url, ADDED_TASK, kind)
        run.add_task = {
            "how": "copy the adapter folder into the store, POST /admin/adapters/{name}/load, first request",
            "copy_s": round(copied - began, 4), "ready_s": round(ready, 4),
            "first_response_s": round(first, 4), "total_s": round(ready + first, 4),
        }
    else:
        total = await first_response(server.url, ADDED_TASK, kind)
        ready = swap_seconds(server.url) or total
        run.add_task = {
            "how": "first request for a model without an engine: stop the least recently used engine, start one",
            "ready_s": round(ready, 4), "first_response_s": round(total - ready, 4), "total_s": round(total, 4),
        }
