"""Serving a parsed request (hosting/serving.py), the step the API routes and the Ray
replicas share: what becomes of each outcome of vLLM's handler."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from adapterserve.errors import ClientGone, InvalidRequest, ServingFailed, Unavailable, model_not_found
from adapterserve.hosting import serving
from adapterserve.hosting.protocol import Target


class Handler:
    def __init__(self, outcome):
        self.outcome = outcome

    async def create_chat_completion(self, request, meta):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if self.outcome == "forever":
            await asyncio.sleep(3600)
        return self.outcome


class Engine:
    name = "generate"

    def __init__(self, outcome, running=True):
        self.handler, self.running = Handler(outcome), running

    def serving(self, kind):
        return self.handler


class Host:
    def __init__(self, state=None):
        self.state = state

    def nonfinite_state(self, model):
        return self.state


def run(outcome, running=True, state=None, adapter=True, disconnected=None):
    target = Target(engine=Engine(outcome, running), vllm_model="pirate", model="pirate",
                    record=SimpleNamespace(labels=[]) if adapter else None)
    meta = serving.RequestMeta({"x-request-id": "r1"})
    return asyncio.run(serving.run(Host(state), target, "chat", SimpleNamespace(model="pirate"), meta, disconnected))


def server_error():
    from vllm.entrypoints.serve import create_error_response

    return create_error_response(RuntimeError("step failed"))


def test_a_domain_error_raised_under_the_handler_passes_through_unchanged():
    # a Ray replica's answer arrives as the domain error it was, never as a 500
    with pytest.raises(type(model_not_found("x"))) as raised:
        run(model_not_found("pirate"))
    assert raised.value.code == "model_not_found"


def test_a_handler_exception_is_answered_as_vllms_server_would():
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    result = run(ValueError("temperature must be non-negative"))
    assert isinstance(result, ErrorResponse) and result.error.code == 400


def test_a_server_error_of_a_dead_engine_is_unavailable_with_a_retry():
    with pytest.raises(Unavailable) as raised:
        run(server_error(), running=False)
    assert raised.value.code == "engine_unavailable" and raised.value.retry_after_s


@pytest.mark.parametrize("state, code", [("quarantined", "adapter_quarantined"), ("reported", "adapter_nonfinite")])
def test_a_server_error_of_an_adapter_with_nonfinite_values_says_so(state, code):
    with pytest.raises(ServingFailed) as raised:
        run(server_error(), state=state)
    assert raised.value.code == code and raised.value.param == "model"


def test_a_server_error_of_the_base_stays_vllms():
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    assert isinstance(run(server_error(), state="quarantined", adapter=False), ErrorResponse)


def test_a_client_that_goes_away_cancels_the_work():
    async def gone():
        await asyncio.sleep(0.05)

    with pytest.raises(ClientGone):
        run("forever", disconnected=gone)


@pytest.mark.parametrize("running, error", [(True, InvalidRequest), (False, Unavailable)])
def test_an_endpoint_the_engine_has_no_handler_for_is_a_clear_error(running, error):
    # the unit fuzzer found it: /v1/responses on an engine without vLLM's Responses handler was a 500
    engine = Engine("never", running)
    engine.serving = lambda kind: None
    target = Target(engine=engine, vllm_model="pirate", model="pirate", record=SimpleNamespace(labels=[]))
    with pytest.raises(error) as raised:
        asyncio.run(serving.run(Host(), target, "responses", SimpleNamespace(model="pirate"), serving.RequestMeta({})))
    if running:
        assert raised.value.code == "unsupported_endpoint" and "/v1/responses" in raised.value.message
