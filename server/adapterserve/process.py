"""The server as a child process, for tests, benchmarks and `compare`.

Starts `python -m adapterserve serve` (or another server module) on a free port in its own
process group, waits until /health is 200, and stops it with SIGTERM (the server's own
shutdown). Only if that fails does it kill, and then by the process group it started,
never by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`entry` is the module and command to run: adapterserve's by default, or another
    OpenAI-compatible server taking --port (the benchmarks run vLLM's own)."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, entry: tuple[str, ...] = ("adapterserve", "serve")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [sys.executable, "-m", *entry, "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> "ServerProcess":
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.tail()}")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group this test started
            self.process.wait(timeout=10)
            return None
        finally:
            self.log.close()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""
