"""SIGTERM: in-flight requests finish or get an error, and no engine process is left; a
signal during start-up (compilation, demo adapter training) ends the server within 10 s."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from adapterserve.server_process import ServerProcess

pytestmark = pytest.mark.integration


def test_sigterm_finishes_in_flight_requests_and_leaves_no_process(tmp_path, base_name):
    server = ServerProcess(["--no-demo-adapters"], tmp_path / "server.log").start()
    children = server.descendants()
    # Python's multiprocessing resource tracker is a child too; it is not an engine process
    # and exits once every process holding its pipe has exited, so a moment after the server
    helpers = [p for p in children if "multiprocessing.resource_tracker" in " ".join(p.cmdline())]
    engine_processes = [p for p in children if p not in helpers]
    assert engine_processes, "the engine runs in child processes"
    outcome = {}

    def stream():
        body = {"model": base_name, "prompt": "Count slowly:", "max_tokens": 200, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
                outcome["status"] = response.status_code
                outcome["body"] = "".join(response.iter_text())
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(1.0)  # the stream is under way
    code = server.stop(timeout=90)
    worker.join(timeout=120)
    # uvicorn finishes its graceful shutdown, then re-raises SIGTERM: exit code -15
    assert code in (0, -15), server.tail()
    # the in-flight request either completed or was told it failed; it did not hang
    assert not worker.is_alive()
    assert "status" in outcome or "error" in outcome
    if outcome.get("status") == 200 and "error" not in outcome:
        assert outcome["body"].rstrip().endswith("[DONE]") or '"error"' in outcome["body"]
    # checked at once: the server's process exits only after its engine processes are gone
    alive = [p.pid for p in engine_processes if _alive(p)]
    assert not alive, f"engine processes left behind: {alive}"
    _, lingering = psutil.wait_procs(helpers, timeout=10)
    assert not [p for p in lingering if _alive(p)], "the resource tracker outlived the server"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_alive(group: int) -> list[int]:
    """Processes of the process group the test started (the server and all it started)."""
    alive = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == group and _alive(process):
                alive.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def _described(pids: list[int]) -> list[str]:
    """Each process as "pid (parent pid): command line", for a failure's message."""
    described = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            described.append(f"{pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            continue
    return described


def _wait_for_log(server: ServerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log_path.read_text(errors="replace"):
        assert server.process.poll() is None, server.tail()
        assert time.monotonic() < deadline, f"{text!r} not logged after {timeout} s:\n{server.tail()}"
        time.sleep(0.5)


def _stopped_within(server: ServerProcess, sig: int, seconds: float) -> float:
    """Send `sig`; assert that the server and every process of its group are gone
    `seconds` later; how long it took."""
    group = server.process.pid  # started in a session of its own: its group id is its pid
    assert len(_group_alive(group)) > 1, "the server has child processes at this point"
    began = time.monotonic()
    server.process.send_signal(sig)
    deadline = began + seconds
    while time.monotonic() < deadline and (server.process.poll() is None or _group_alive(group)):
        time.sleep(0.2)
    took = time.monotonic() - began
    left = _group_alive(group)
    if server.process.poll() is None:
        left.append(server.process.pid)
    if left:  # kill what the test started, by its group, before failing
        os.killpg(group, signal.SIGKILL)
    assert not left, f"alive {seconds} s after the signal: {left}\n{server.tail()}"
    return took


def test_sigterm_during_compilation_ends_the_server_within_10_s(tmp_path):
    # an empty compile cache: the engine compiles (over a minute on 2 CPUs) when stopped
    server = ServerProcess(
        ["--no-demo-adapters", "--no-enforce-eager"], tmp_path / "server.log", env={"VLLM_CACHE_ROOT": str(tmp_path / "vllm")},
    ).launch()
    _wait_for_log(server, "Warming up model for the compilation", timeout=300)
    time.sleep(3)  # inside the compilation
    took = _stopped_within(server, signal.SIGTERM, 10)
    assert "ready in" not in server.log_path.read_text(), "the engine finished starting: not stopped mid-compilation"
    assert took < 10


def test_sigint_during_demo_adapter_training_ends_the_server_within_10_s(tmp_path, base_path):
    # a cache without the demo adapters: start-up trains them (a child process) when stopped
    cache = tmp_path / "cache"
    server = ServerProcess(
        ["--base-model", str(base_path), "--cache-dir", str(cache)], tmp_path / "server.log",
    ).launch()
    _wait_for_log(server, "(in a child process)", timeout=120)
    time.sleep(8)  # the child has imported torch and is training
    _stopped_within(server, signal.SIGINT, 10)
    store = cache / "adapters" / base_path.name
    built = [p.name for p in store.iterdir() if not p.name.startswith(".")] if store.is_dir() else []
    for name in built:  # whatever is in the store under its own name is complete
        assert (store / name / "adapterserve-build.json").is_file(), name


def test_an_engine_not_ready_within_its_start_timeout_is_stopped_and_the_start_fails(tmp_path):
    server = ServerProcess(
        ["--no-demo-adapters", "--no-enforce-eager", "--engine-start-timeout-s", "15"], tmp_path / "server.log",
        env={"VLLM_CACHE_ROOT": str(tmp_path / "vllm")},  # compiles: far longer than 15 s
    ).launch()
    group = server.process.pid
    code = server.process.wait(timeout=180)
    server.log.close()
    log = server.log_path.read_text()
    assert code != 0 and "engine generate was not ready after 15 s (engine_start_timeout_s)" in log, server.tail()
    assert "ready in" not in log
    deadline = time.monotonic() + 10
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _described(_group_alive(group))
    if left:  # kill what the test started, by its group, before failing
        os.killpg(group, signal.SIGKILL)
    assert not left, f"alive 10 s after the server exited: {left}\n{server.tail()}"
