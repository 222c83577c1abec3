"""The processes of an engine whose construction is abandoned (a stop during start-up, a
start past its timeout): vLLM's own shutdown cannot be reached then (there is no client
yet), so the processes its construction started are found and stopped here, by process
id. vLLM's own helpers stop the processes of a client it has built; these cover the time
before.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import threading

import psutil

log = logging.getLogger(__name__)


# After the processes of an abandoned construction are stopped, how long to wait for
# vLLM's construction to notice (its start-up handshake fails as soon as they are gone).
ABANDONED_CONSTRUCTION_WAIT_S = 5.0
# How long the processes of an abandoned construction get to be gone once killed (the
# resource trackers among them exit by themselves); what is left is killed after it.
TERMINATE_WAIT_S = 3.0


def spawned_children() -> set[int]:
    """Process ids of the children this process started through multiprocessing (vLLM
    starts its engine cores so); not the resource tracker, which every engine shares."""
    return {child.pid for child in multiprocessing.active_children() if child.pid}


def stop_trees(name: str, roots: list[int]) -> None:
    """Stop processes and all their descendants, by process id. Used for an engine whose
    construction is abandoned, where vLLM's own shutdown cannot be reached (no client yet).

    A process still starting up starts others (the engine core its worker, the worker its
    compile pool): one started after the tree was listed, or by a signal handler, would
    be orphaned and missed. So the tree is frozen first (SIGSTOP, from the roots down,
    until a listing finds no process not yet frozen: a stopped process starts nothing),
    then killed. No SIGTERM: its handlers would run vLLM's shutdown, which starts work;
    nothing of an unfinished start is worth saving. Resource trackers are left to exit by
    themselves once the processes holding their pipe are gone: they unlink the shared
    memory the killed ones leave (killed later if they do not)."""
    frozen, trackers = _freeze(processes_of(roots))
    if not frozen and not trackers:
        return
    log.warning("engine %s: stopping the %d processes of its unfinished start", name, len(frozen) + len(trackers))
    for process in frozen:
        try:
            process.kill()  # SIGKILL ends a stopped process too
        except psutil.NoSuchProcess:
            pass
    reap(name, frozen + trackers, TERMINATE_WAIT_S)


def _freeze(roots: list[psutil.Process]) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """Stop (SIGSTOP) the roots and all their descendants; (the stopped, the resource
    trackers found among them, not stopped)."""
    frozen: list[psutil.Process] = []
    trackers: list[psutil.Process] = []
    pending = list(roots)
    while pending:
        before = len(frozen)
        for process in pending:
            try:
                if _is_resource_tracker(process):
                    trackers.append(process)
                    continue
                process.suspend()
                frozen.append(process)
            except psutil.NoSuchProcess:
                continue
        # a process's children listed once it is stopped are all it will ever have
        newly, seen = frozen[before:], set(frozen) | set(trackers)
        pending = []
        for process in newly:
            try:
                pending += [child for child in process.children() if child not in seen and child not in pending]
            except psutil.NoSuchProcess:
                continue
    return frozen, trackers


def _is_resource_tracker(process: psutil.Process) -> bool:
    return "multiprocessing.resource_tracker" in " ".join(process.cmdline())


def construct_in_thread(construct) -> concurrent.futures.Future:
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


def reap(name: str, processes: list[psutil.Process], wait_s: float) -> None:
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


def shut_down_late_client(construction: concurrent.futures.Future, client=None) -> None:
    """Shut down a client whose construction was abandoned but ended with one anyway."""
    if client is None:
        if construction.cancelled() or construction.exception() is not None:
            return
        client = construction.result()
    try:
        client.shutdown()
    except Exception:  # its processes are gone already; nothing else to release
        log.debug("late engine client did not shut down cleanly", exc_info=True)


def processes_of(pids) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found
