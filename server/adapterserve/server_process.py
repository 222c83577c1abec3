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


# `adapterserve serve` exits with this when its port is taken (EADDRINUSE on Linux): a
# free port picked here can be taken by another process before the server binds it.
PORT_IN_USE_EXIT = 98
PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`entry` is the module and command to run: adapterserve's by default, or another
    OpenAI-compatible server taking --port (the benchmarks run vLLM's own)."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict | None = None, entry: tuple[str, ...] = ("adapterserve", "serve"),
        program: tuple[str, ...] | None = None, cwd: Path | None = None, base_env: dict | None = None,
    ):
        """`program` replaces `python -m <entry>` (an installed console script, say); `cwd`
        is where it runs; `base_env` replaces this process's environment under `env`."""
        self.entry, self.server_args = entry, args
        self.program = program or (sys.executable, "-m", *entry)
        self.cwd = cwd
        self.log_path = log_path
        self.env = {**(os.environ if base_env is None else base_env), **(env or {})}
        self.process: subprocess.Popen | None = None
        self._pick_port()

    def _pick_port(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [*self.program, "--port", str(self.port), *self.server_args]

    def _spawn(self, log_mode: str) -> None:
        self.log = open(self.log_path, log_mode)
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd,
        )

    def start(self, timeout: float = 600) -> "ServerProcess":
        return self.launch().wait_healthy(timeout)

    def launch(self) -> "ServerProcess":
        """Start the process without waiting for it: servers launched one after the other
        then start side by side, and `wait_healthy` waits for each."""
        self._spawn("w")
        return self

    def wait_healthy(self, timeout: float = 600) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        attempts = 1
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if self.process.returncode == PORT_IN_USE_EXIT and attempts < PORT_ATTEMPTS:
                    attempts += 1  # the port was taken after it was picked: another one
                    self.log.close()
                    self._pick_port()
                    self._spawn("a")
                    continue
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


class RayCluster:
    """A local Ray head node on free ports (`ray start --head --block`, in its own process
    group), for tests and benchmarks of the Ray Serve application. Stopped with SIGTERM
    (`ray start --block` then stops what it started), and only if that fails killed by the
    process group it started, never by name."""

    PORTS = (
        "port", "ray-client-server-port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
    )

    def __init__(self, log_path: Path, num_cpus: int | None = None, object_store_bytes: int = 256 * 1024**2,
                 env: dict[str, str] | None = None):
        self.ports = {name: free_port() for name in self.PORTS}
        self.address = f"127.0.0.1:{self.ports['port']}"
        # Ray's sockets live under its temp dir: a short path (Unix sockets allow ~100 bytes)
        self.temp_dir = Path(f"/tmp/ray-{self.ports['port']}")
        self.log_path = log_path
        ray = Path(sys.executable).parent / "ray"
        self.args = [
            str(ray), "start", "--head", "--block", "--include-dashboard=false", "--disable-usage-stats",
            f"--num-cpus={num_cpus or os.cpu_count()}", f"--object-store-memory={object_store_bytes}",
            f"--temp-dir={self.temp_dir}", *(f"--{name}={port}" for name, port in self.ports.items()),
        ]
        # A replica killed with SIGKILL leaves its engine processes: the raylet adopts and
        # stops them (Ray's subreaper), so a killed replica leaks no vLLM engine.
        # `env`: what the replicas' processes should see (e.g. the AWS environment of an S3 source)
        self.env = {**os.environ, **(env or {}), "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper": "true"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "RayCluster":
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.args, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        ray = Path(sys.executable).parent / "ray"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            status = subprocess.run([str(ray), "status", f"--address={self.address}"], env=self.env, capture_output=True, text=True)
            if status.returncode == 0:
                return self
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"the Ray head was not up after {timeout} s")

    def stop(self, timeout: float = 60) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # anything of the group left behind
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.log.close()
