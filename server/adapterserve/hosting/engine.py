"""One vLLM engine (AsyncLLM in its own processes) and vLLM's OpenAI serving objects over it.

The serving objects (chat, completions, classification, models) are vLLM's own, built by
vLLM's `init_app_state` from an argument namespace made by vLLM's own CLI parser, so
every request field, default and validation behaves as in `vllm serve`. adapterserve
only decides which engine and which adapter a request goes to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
from starlette.datastructures import State

from adapterserve.dtypes import resolve_dtype

from .nonfinite import ENV_COUNT_NANS, watch_nonfinite

log = logging.getLogger(__name__)

Runner = Literal["generate", "pooling"]


@dataclass
class EngineSpec:
    """What one engine loads and how big it may grow."""

    name: str  # the engine's id in logs and metrics: "generate", "classify", or a model name
    model_path: Path
    served_model_name: str
    runner: Runner = "generate"
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    enforce_eager: bool = False  # compiled, as vLLM's default
    enable_lora: bool = False
    max_loras: int = 16
    max_lora_rank: int = 64
    max_cpu_loras: int = 16
    # pooling engines: label count of the widest head (vLLM sizes the score layer by it)
    num_labels: int | None = None
    max_lora_cls_labels: int | None = None
    # vLLM's Prometheus logger unregisters every vllm: metric of the process when it
    # starts, so only one engine per process can report vLLM's own metrics.
    log_stats: bool = True
    # generation engines: vLLM's --tool-call-parser (None: no tool calling)
    tool_call_parser: str | None = None
    # an engine not ready after this long is stopped and its start fails (engine_start_timeout_s)
    start_timeout_s: float = 600.0
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings, name: str, model_path: Path, served_model_name: str, **extra) -> "EngineSpec":
        """The engine-wide settings (dtype, context, KV cache, LoRA limits), then `extra`
        (which wins: the shared host passes the LoRA rank it fitted to the stores)."""
        values = dict(
            name=name,
            model_path=model_path,
            served_model_name=served_model_name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
            enforce_eager=settings.enforce_eager,
            max_loras=settings.max_loras,
            max_lora_rank=settings.fixed_lora_rank or 64,
            max_cpu_loras=settings.max_cpu_loras,
            start_timeout_s=settings.engine_start_timeout_s,
            tool_call_parser=settings.tool_call_parser,
        )
        return cls(**{**values, **extra})

    def cli_args(self) -> list[str]:
        """The same flags `vllm serve` would take for this engine."""
        args = [
            "--model", str(self.model_path),
            "--served-model-name", self.served_model_name,
            "--dtype", resolve_dtype(self.dtype),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes),
            "--disable-uvicorn-access-log",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.enable_lora:
            args += [
                "--enable-lora",
                "--max-loras", str(self.max_loras),
                "--max-lora-rank", str(self.max_lora_rank),
                "--max-cpu-loras", str(max(self.max_cpu_loras, self.max_loras)),
            ]
        if self.runner == "generate" and self.tool_call_parser:
            # vLLM 0.32 reads tool calls (for every tool_choice) only with auto tool choice on
            args += ["--tool-call-parser", self.tool_call_parser, "--enable-auto-tool-choice"]
        if self.runner == "pooling":
            args += ["--runner", "pooling", "--convert", "classify"]
            if self.num_labels is not None:
                args += ["--hf-overrides", f'{{"num_labels": {self.num_labels}}}']
            if self.max_lora_cls_labels is not None:
                args += ["--max-lora-cls-labels", str(self.max_lora_cls_labels)]
        return args + self.extra_args


def parse_vllm_args(cli_args: list[str]):
    """vLLM's own server argument namespace for these flags (all defaults filled in)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="adapterserve-engine"))
    return parser.parse_args(cli_args)


# After the processes of an abandoned construction are stopped, how long to wait for
# vLLM's construction to notice (its start-up handshake fails as soon as they are gone).
ABANDONED_CONSTRUCTION_WAIT_S = 5.0
# SIGTERM first (vLLM's processes exit cleanly on it), SIGKILL what is left after this.
TERMINATE_WAIT_S = 3.0


def _spawned_children() -> set[int]:
    """Process ids of the children this process started through multiprocessing (vLLM
    starts its engine cores so); not the resource tracker, which every engine shares."""
    return {child.pid for child in multiprocessing.active_children() if child.pid}


def _stop_trees(name: str, roots: list[int]) -> None:
    """Stop processes and all their descendants: SIGTERM, then SIGKILL (by process id)
    whatever is alive after TERMINATE_WAIT_S. Used for an engine whose construction is
    abandoned, where vLLM's own shutdown cannot be reached (it has no client yet)."""
    processes: list[psutil.Process] = []
    for root in _processes(roots):
        try:
            processes += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    if not processes:
        return
    log.warning("engine %s: stopping the %d processes of its unfinished start", name, len(processes))
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _reap(name, processes, TERMINATE_WAIT_S)


def _construct_in_thread(construct) -> concurrent.futures.Future:
    """Run vLLM's engine construction in a thread of its own; its future.

    `AsyncLLM.from_vllm_config` starts the engine core and waits for it to be ready
    (~30 s on 2 cores): on the event loop that would stall every other engine, /health and
    /metrics while an engine restarts or swaps in. Built outside a running loop, vLLM
    starts its output tasks lazily, at the first request or utility call. The future is
    kept by the engine, so a stop during the construction (SIGTERM during start-up or a
    restart, a start past its timeout) stops the processes it started, without waiting
    for it: no engine process is left behind."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(construct())
        except BaseException as exc:  # handed to whoever waits
            future.set_exception(exc)

    threading.Thread(target=run, name="engine-construction", daemon=True).start()
    return future


async def start_together(starts) -> None:
    """Await engine starts (coroutines) at the same time and return once every one has
    ended; the first failure is raised then (the caller's stop stops every engine, started
    or not).

    An engine's start is mostly its spawned processes importing torch and vLLM: measured on
    2 cores, the generate and classify engines of a server started together in 39-41 s,
    one after the other in 54-57 s (the server ready in 52-56 s instead of 67-71). vLLM sets
    the same environment for every engine it starts in a process, so the starts do not
    disturb each other. Engines that start together are also stopped together when one of
    them is abandoned (each one's unfinished start owns every process started since it
    began); the caller stops them all when one fails, so nothing is lost by that."""
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _reap(name: str, processes: list[psutil.Process], wait_s: float) -> None:
    """Wait for the processes to exit; kill (by process id) those that outlive `wait_s`.
    psutil.Process objects remember their start time: a process id reused since is never
    taken for the engine's process."""
    processes = [p for p in processes if p.is_running()]
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    for process in alive:
        log.warning("engine %s: process %d outlived the shutdown; killing it", name, process.pid)
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _shut_down_late_client(construction: concurrent.futures.Future, client=None) -> None:
    """Shut down a client whose construction was abandoned but ended with one anyway."""
    if client is None:
        if construction.cancelled() or construction.exception() is not None:
            return
        client = construction.result()
    try:
        client.shutdown()
    except Exception:  # its processes are gone already; nothing else to release
        log.debug("late engine client did not shut down cleanly", exc_info=True)


def _processes(pids) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


class VllmEngine:
    """A vLLM engine with its serving objects (the `Engine` protocol); `start()` then `stop()`."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.client = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.state = State()  # vLLM's serving objects, as vLLM's server keeps them
        self.supported_tasks: tuple[str, ...] = ()
        self.started_at: float | None = None
        self.startup_seconds: float | None = None
        self.vllm_config = None
        self.on_started = None  # called with the engine once its client exists (metrics use it)
        self._construction: concurrent.futures.Future | None = None  # while vLLM builds the client
        self._children_before: set[int] = set()  # this process's children when the construction began
        self._processes: list[psutil.Process] = []
        # called with (adapter name or None, request id) when a request's logits hold NaN
        self.on_nonfinite = lambda adapter, request_id: None

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self) -> None:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        began = time.monotonic()
        args = parse_vllm_args(self.spec.cli_args())
        engine_args = AsyncEngineArgs.from_cli_args(args)
        self.vllm_config = engine_args.create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER
        )
        log.info("starting engine %s (%s) from %s", self.name, self.spec.runner, self.spec.model_path)
        if self.spec.runner == "generate" and self.spec.tool_call_parser:
            from adapterserve.models import chat_template_renders_tools

            if not chat_template_renders_tools(self.spec.model_path):
                log.info(
                    "engine %s: the chat template does not render tools; tool_choice 'required' and named functions "
                    "are answered through structured output, and with 'auto' the model answers in text", self.name,
                )
        if self.spec.runner == "generate":
            # the engine's workers count NaN logits per request (inherited by its processes)
            os.environ[ENV_COUNT_NANS] = "1"
        self._children_before = _spawned_children()
        self._construction = _construct_in_thread(
            functools.partial(
                AsyncLLM.from_vllm_config,
                vllm_config=self.vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=False,
                disable_log_stats=not self.spec.log_stats,
            )
        )
        # shield: a cancelled start leaves the construction to `stop()`, which abandons it
        try:
            self.client = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self._construction)), timeout=self.spec.start_timeout_s
            )
        except asyncio.TimeoutError:
            await asyncio.to_thread(self._abandon_construction)
            raise TimeoutError(
                f"engine {self.name} was not ready after {self.spec.start_timeout_s:.0f} s (engine_start_timeout_s)"
            ) from None
        self._construction = None
        if self.spec.runner == "generate":
            watch_nonfinite(self.client, lambda adapter, request_id: self.on_nonfinite(adapter, request_id))
        if self.on_started is not None:
            self.on_started(self)
        try:
            self.supported_tasks = tuple(await self.client.get_supported_tasks())
            await init_app_state(self.client, self.state, args, self.supported_tasks)
        except BaseException:
            self.stop()
            raise
        # its processes as started: when the engine core dies, its workers are no longer
        # its children (the system adopts them) but must be stopped with the engine
        self._processes = _processes(self.process_ids())
        self.started_at = time.time()
        self.startup_seconds = time.monotonic() - began
        log.info("engine %s ready in %.1f s", self.name, self.startup_seconds)

    def stop(self, wait_s: float = 30.0) -> None:
        """Shut the engine down and return only once its processes are gone (idempotent).

        vLLM's shutdown signals the engine core and returns; the core then stops its
        workers. Waiting here (and killing, by process id, what outlives `wait_s`) is what
        lets the server's own process exit last, with no engine process left behind."""
        _reap(self.name, self._shut_down(), wait_s)

    async def stop_async(self, wait_s: float = 30.0) -> None:
        """`stop()` for a running server: the wait for the processes runs in a thread, so
        the other engines keep serving meanwhile."""
        await asyncio.to_thread(_reap, self.name, self._shut_down(), wait_s)

    def _shut_down(self) -> list[psutil.Process]:
        """vLLM's shutdown of the client (in the event loop's thread: it cancels tasks of
        that loop); returns the processes it had, adopted workers of a dead core included.
        A stop while vLLM still builds the engine (start-up, compilation) does not wait for
        it: its processes are stopped at once (`_abandon_construction`)."""
        construction = self._construction
        if self.client is None and construction is not None:
            if construction.done() and not construction.cancelled() and construction.exception() is None:
                self.client, self._construction = construction.result(), None  # built just now: shut down below
            else:
                self._abandon_construction()
        current = _processes(self.process_ids())
        processes = current + [p for p in self._processes if p not in current]
        self._processes = []
        client, self.client = self.client, None
        if client is None:
            return []
        log.info("stopping engine %s", self.name)
        try:
            client.shutdown(timeout=self.vllm_config.shutdown_timeout if self.vllm_config else None)
        except Exception:  # a dead engine may fail to shut down cleanly; its processes are reaped next
            log.exception("engine %s did not shut down cleanly", self.name)
        return processes

    def _abandon_construction(self) -> None:
        """Stop an engine vLLM is still building: stop the processes it started (every child
        this process started through multiprocessing since the construction began; starts
        that run together are stopped together, see `start_together`), which makes vLLM's
        start-up handshake fail within a moment. A client that is built nonetheless is shut
        down. Waiting for the construction instead takes minutes during a first compile."""
        construction, self._construction = self._construction, None
        if construction is None:
            return
        _stop_trees(self.name, sorted(_spawned_children() - self._children_before))
        try:
            client = construction.result(timeout=ABANDONED_CONSTRUCTION_WAIT_S)
        except Exception:  # failed, as expected with its processes gone, or still waiting
            construction.add_done_callback(_shut_down_late_client)
            return
        _shut_down_late_client(construction, client)

    # --- state -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.client is not None and not self.client.errored and not self._dead_processes()

    def _dead_processes(self) -> list[int]:
        """Engine core processes that have exited (seen before vLLM itself notices)."""
        dead = []
        for pid in self._engine_core_pids():
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    dead.append(pid)
            except psutil.NoSuchProcess:
                dead.append(pid)
        return dead

    async def check_health(self) -> str | None:
        """None when healthy, else the reason."""
        if self.client is None:
            return "not started"
        if self.client.errored:
            return f"engine dead: {self.client.dead_error}"
        if dead := self._dead_processes():
            return f"engine dead: process {dead[0]} exited"
        try:
            await asyncio.wait_for(self.client.check_health(), timeout=3)
        except Exception as exc:  # any failure means: not ready to serve
            return f"health check failed: {exc}"
        return None

    def process_ids(self) -> list[int]:
        """The engine's own processes (engine core and its workers), for memory accounting.

        The engine core is a child of this (API) process; its workers are its children.
        """
        if self.client is None:
            return []
        pids: list[int] = []
        for pid in self._engine_core_pids():
            pids.append(pid)
            try:
                pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return pids

    def _engine_core_pids(self) -> list[int]:
        resources = getattr(getattr(self.client, "engine_core", None), "resources", None)
        manager = getattr(resources, "engine_manager", None)
        procs = getattr(manager, "processes", None) or []
        return [proc.pid for proc in procs if getattr(proc, "pid", None)]

    # --- serving objects ---------------------------------------------------------
    def serving(self, kind: str) -> Any:
        """vLLM's serving object: 'chat', 'completion', 'responses', 'classify' or 'models'."""
        attribute = {
            "chat": "openai_serving_chat",
            "completion": "openai_serving_completion",
            "responses": "openai_serving_responses",
            "classify": "serving_classification",
            "models": "openai_serving_models",
        }[kind]
        return getattr(self.state, attribute, None)

