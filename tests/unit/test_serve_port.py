"""`adapterserve serve` claims its port before it starts any engine: a port in use fails
at once, with a clear message and the exit code `ServerProcess` answers by picking another
port (a free port picked by a test can be taken before the server binds it)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from adapterserve import server_process as process
from adapterserve.server_process import PORT_ATTEMPTS, PORT_IN_USE_EXIT, ServerProcess


def held_port() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_a_port_in_use_fails_at_once_before_any_engine_starts():
    with held_port() as held:
        port = held.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "adapterserve", "serve", "--port", str(port), "--no-demo-adapters"],
            capture_output=True, text=True, timeout=300,
        )
    output = result.stdout + result.stderr
    assert result.returncode == PORT_IN_USE_EXIT, output
    assert f"cannot listen on 127.0.0.1:{port}" in output and "Address already in use" in output
    assert "adapterserve.hosting.engine" not in output  # no engine was started (its logger says so when one is)


def test_server_process_tries_another_port_when_its_port_is_taken(tmp_path, monkeypatch):
    held = [held_port() for _ in range(PORT_ATTEMPTS)]
    picked = []

    def next_taken_port() -> int:
        picked.append(held[len(picked)].getsockname()[1])
        return picked[-1]

    monkeypatch.setattr(process, "free_port", next_taken_port)
    try:
        server = ServerProcess(["--no-demo-adapters"], tmp_path / "server.log")
        with pytest.raises(RuntimeError, match=f"server exited with {PORT_IN_USE_EXIT}"):
            server.start(timeout=300)
    finally:
        for sock in held:
            sock.close()
    assert len(set(picked)) == PORT_ATTEMPTS  # a new port each time, then it gives up
    assert (tmp_path / "server.log").read_text().count("cannot listen on") == PORT_ATTEMPTS
