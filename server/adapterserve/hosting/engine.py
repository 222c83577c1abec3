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
import time
from typing import Any

import psutil
from starlette.datastructures import State


from .engine_processes import (
    ABANDONED_CONSTRUCTION_WAIT_S, construct_in_thread, processes_of, reap, shut_down_late_client, spawned_children, stop_trees,
)
from .engine_environment import apply as apply_environment
from .engine_spec import EngineSpec, parse_vllm_args  # noqa: F401 (the engine's spec, re-exported)
from .nonfinite import watch_nonfinite

log = logging.getLogger(__name__)

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
        apply_environment(self.spec.environment)  # before its configuration, which reads some of it
        args = parse_vllm_args(self.spec.cli_args())
        engine_args = AsyncEngineArgs.from_cli_args(args)
        self.vllm_config = engine_args.create_engine_config(
            usage_context=UsageContext.OPENAI_API_SERVER
        )
        log.info("starting engine %s (%s) from %s", self.name, self.spec.runner, self.spec.model_path)
        if self.spec.runner == "generate" and self.spec.tool_call_parser:
            from adapterserve.base_model import chat_template_renders_tools

            if not chat_template_renders_tools(self.spec.model_path):
                log.info(
                    "engine %s: the chat template does not render tools; tool_choice 'required' and named functions "
                    "are answered through structured output, and with 'auto' the model answers in text", self.name,
                )
        self._children_before = spawned_children()
        self._construction = construct_in_thread(
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
        self._processes = processes_of(self.process_ids())
        self.started_at = time.time()
        self.startup_seconds = time.monotonic() - began
        log.info("engine %s ready in %.1f s", self.name, self.startup_seconds)

    def stop(self, wait_s: float = 30.0) -> None:
        """Shut the engine down and return only once its processes are gone (idempotent).

        vLLM's shutdown signals the engine core and returns; the core then stops its
        workers. Waiting here (and killing, by process id, what outlives `wait_s`) is what
        lets the server's own process exit last, with no engine process left behind."""
        reap(self.name, self._shut_down(), wait_s)

    async def stop_async(self, wait_s: float = 30.0) -> None:
        """`stop()` for a running server: the wait for the processes runs in a thread, so
        the other engines keep serving meanwhile."""
        await asyncio.to_thread(reap, self.name, self._shut_down(), wait_s)

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
        current = processes_of(self.process_ids())
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
        stop_trees(self.name, sorted(spawned_children() - self._children_before))
        try:
            client = construction.result(timeout=ABANDONED_CONSTRUCTION_WAIT_S)
        except concurrent.futures.TimeoutError:  # still building: it may have started a process since
            stop_trees(self.name, sorted(spawned_children() - self._children_before))
            construction.add_done_callback(shut_down_late_client)
            return
        except Exception:  # failed, as expected with its processes gone
            return
        shut_down_late_client(construction, client)

    # --- state -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.client is not None and not self.client.errored and not self._deadprocesses_of()

    def _deadprocesses_of(self) -> list[int]:
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
        if dead := self._deadprocesses_of():
            return f"engine dead: process {dead[0]} exited"
        try:
            await asyncio.wait_for(self.client.check_health(), timeout=3)
        except Exception as exc:  # any failure means: not ready to serve
            return f"health check failed: {exc}"
        return None

    def unfinished_requests(self) -> int:
        processor = getattr(self.client, "output_processor", None)  # vLLM's, in this process
        return processor.get_num_unfinished_requests() if processor is not None else 0

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

