"""A non-streamed request whose client goes away stops generating: the engine's running
count (vLLM's own gauge) drops within a second or two of the disconnect, instead of the
request generating to its end for nobody."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def running(server) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:num_requests_running is not exported")


def test_a_request_whose_client_left_is_aborted(server, base_name):
    body = {"model": base_name, "prompt": "Count from one to one thousand:", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}  # ~30-60 s of generation on this machine's CPUs
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=3))
    left = time.monotonic()  # the client closed its connection at the read timeout
    # it was generating when the client left
    deadline, seen = left + 10, None
    while time.monotonic() < deadline:
        seen = running(server)
        if seen == 0:
            break
        time.sleep(0.1)
    stopped_after = time.monotonic() - left
    print(f"running count 0 after {stopped_after:.2f} s")
    assert seen == 0 and stopped_after < 2.0, (seen, stopped_after)


def test_the_request_was_running_when_its_client_left(server, base_name):
    """The test above would pass if nothing had run: check that such a request does run."""
    body = {"model": base_name, "prompt": "Count from one to one thousand:", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}
    import threading

    outcome = {}

    def call():
        try:
            httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=4))
        except httpx.ReadTimeout as exc:
            outcome["timeout"] = exc

    worker = threading.Thread(target=call)
    worker.start()
    deadline, peak = time.monotonic() + 3, 0.0
    while time.monotonic() < deadline:
        peak = max(peak, running(server))
        time.sleep(0.1)
    worker.join()
    assert peak >= 1 and "timeout" in outcome
