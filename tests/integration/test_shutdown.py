"""SIGTERM: in-flight requests finish or get an error, and no engine process is left."""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest

from adapterserve.process import ServerProcess

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
