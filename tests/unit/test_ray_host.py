"""The Ray Serve pieces that run without Ray: what crosses between ingress and replicas,
the ingress's host over a recording stand-in for Ray's DeploymentHandle (routing options,
catalog use, admin fan-out rules), and the metrics page merged over replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.config import Settings
from adapterserve.api.errors import as_api_error as http
from adapterserve.errors import Conflict, DomainError, NotFound, engine_unavailable, model_not_found
from adapterserve.hosting.protocol import HostObserver, ModelCard
from adapterserve.rayserve import wire
from adapterserve.rayserve.replica_set import ReplicaSetHost
from adapterserve.metrics.federation import merge_pages
from adapterserve.registry.records import AdapterRecord

BASE = "tiny-base"


def record(name: str, kind: str = "lora") -> AdapterRecord:
    return AdapterRecord(name, kind, Path(f"/snap/{name}"), 8, ["q_proj"], 100, 1000, BASE, labels=["no", "yes"] if kind == "head" else [])


def catalog() -> wire.Catalog:
    records = {"pirate": record("pirate"), "sentiment": record("sentiment", "head")}
    cards = [ModelCard(BASE, BASE, None, "base", 0)] + [ModelCard(n, n, BASE, r.kind, 0) for n, r in records.items()]
    return wire.Catalog(base_name=BASE, cards=cards, records=records, problems=[], stores=["/stores/a"], pinned=set(),
                        lora_rank=8, replica="r1")


async def _value(value):
    if isinstance(value, BaseException):
        raise value
    return value


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        self.handle.calls.append((self.name, dict(self.handle.current), args))
        return _value(self.handle.replies[self.name](*args))


class _Broadcast:
    def __init__(self, results):
        self.results = results

    async def results_async(self, timeout_s=None, return_exceptions=False):
        return self.results


class RecordingHandle:
    """Stands in for Ray's DeploymentHandle: records options and calls, answers from `replies`."""

    def __init__(self, replies=None, broadcasts=None):
        self.calls: list[tuple[str, dict, tuple]] = []
        self.current: dict = {}
        self.replies = {"catalog": lambda: catalog(), **(replies or {})}
        self.broadcasts = broadcasts or {}

    def options(self, **options):
        view = RecordingHandle(self.replies, self.broadcasts)
        view.calls, view.current = self.calls, options
        return view

    def __getattr__(self, name):
        return _Method(self, name)

    def broadcast(self, method, *args):
        self.calls.append((f"broadcast:{method}", {}, args))
        return _Broadcast(self.broadcasts[method])


def host(handle, affinity=True, used=None) -> ReplicaSetHost:
    observer = HostObserver(tokens_used=lambda *tokens: used.append(tokens)) if used is not None else None
    made = ReplicaSetHost(Settings(), handle, observer, adapter_affinity=affinity)
    made.catalog = catalog()
    return made


def test_errors_cross_as_data_and_come_back_whole():
    sent = engine_unavailable("generate")
    back = wire.error_from_fields(wire.error_fields(sent))
    assert (http(back).status, back.message, back.code, http(back).headers) == (503, sent.message, "engine_unavailable", {"Retry-After": "10"})
    with pytest.raises(DomainError) as raised:
        wire.unwrap(wire.error(model_not_found("x")))
    assert http(raised.value).status == 404 and raised.value.param == "model"
    assert wire.unwrap(wire.ok(3)) == 3
    assert asyncio.run(wire.replying(_value(Conflict("busy", code="c")))) == ("error", {"kind": "Conflict", "message": "busy", "param": None, "code": "c", "retry_after_s": None})


def test_names_in_the_catalog_resolve_without_a_replica_call():
    handle = RecordingHandle()
    target = asyncio.run(host(handle).resolve("pirate", "chat"))
    assert (target.model, target.vllm_model, target.record.kind) == ("pirate", "pirate", "lora")
    base = asyncio.run(host(handle).resolve(f"{BASE}:pirate", "completion"))
    assert base.model == "pirate"
    assert asyncio.run(host(handle).resolve(BASE, "chat")).record is None
    assert handle.calls == []


@pytest.mark.parametrize("model, endpoint, status", [("sentiment", "chat", 400), ("pirate", "classify", 400), (BASE, "classify", 400), ("", "chat", 400)])
def test_wrong_endpoint_and_missing_model_are_answered_at_the_ingress(model, endpoint, status):
    with pytest.raises(DomainError) as raised:
        asyncio.run(host(RecordingHandle()).resolve(model, endpoint))
    assert http(raised.value).status == status


def test_an_unknown_name_is_decided_by_a_replica_with_the_name_as_multiplexed_id():
    handle = RecordingHandle({"resolve": lambda model, endpoint: wire.error(model_not_found(model))})
    with pytest.raises(DomainError) as raised:
        asyncio.run(host(handle).resolve("new-one", "chat"))
    assert http(raised.value).status == 404
    assert handle.calls == [("resolve", {"multiplexed_model_id": "new-one"}, ("new-one", "chat"))]

    found = RecordingHandle({"resolve": lambda model, endpoint: wire.ok(record("new-one"))})
    assert asyncio.run(host(found).resolve("new-one", "completion")).record.name == "new-one"


class _Request:
    def __init__(self, model):
        self.model = model


class _Raw:
    headers = {"X-Request-Id": "abc", "Authorization": "Bearer secret"}


class _Stream:
    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class StreamingHandle(RecordingHandle):
    def __init__(self, items):
        super().__init__()
        self.stream = _Stream(items)

    def options(self, **options):
        self.calls.append(("options", options, ()))
        return self

    @property
    def generate(self):
        outer = self

        class _Gen:
            def remote(self, endpoint, request, headers):
                outer.calls.append(("generate", {}, (endpoint, request.model, headers)))
                return outer.stream

        return _Gen()


@pytest.mark.parametrize("affinity, model, routed", [(True, "pirate", {"multiplexed_model_id": "pirate"}), (False, "pirate", {}), (True, BASE, {})])
def test_adapter_requests_carry_their_name_base_requests_none(affinity, model, routed):
    handle, used = StreamingHandle([("json", {"id": "x", "choices": []}), ("usage", (5, 7))]), []
    body = asyncio.run(host(handle, affinity, used).generate("chat", _Request(model), _Raw()))
    assert body.model_dump() == {"id": "x", "choices": []}
    assert used == [(5, 7)]  # the replica's token counts reach the ingress's tenant accounting
    assert handle.calls[0] == ("options", {"stream": True, **routed}, ())
    assert handle.calls[1] == ("generate", {}, ("chat", model, {"X-Request-Id": "abc"}))  # never the credentials


def test_a_replica_error_is_raised_and_a_stream_yields_the_replicas_chunks():
    failing = StreamingHandle([wire.error(model_not_found("pirate"))])
    with pytest.raises(DomainError) as raised:
        asyncio.run(host(failing).generate("chat", _Request("pirate"), _Raw()))
    assert http(raised.value).status == 404 and failing.stream.cancelled

    streaming = StreamingHandle([("stream", None), ("chunk", "data: 1\n\n"), ("chunk", "data: [DONE]\n\n"), ("usage", (2, 9))])
    used = []

    async def read():
        chunks = await host(streaming, used=used).generate("completion", _Request("pirate"), _Raw())
        seen = []
        async for chunk in chunks:
            seen.append((chunk, list(used)))  # what had been counted when each chunk left
        return seen

    # the last chunk leaves only once the usage is counted (the client's next request is held to it)
    assert asyncio.run(read()) == [("data: 1\n\n", []), ("data: [DONE]\n\n", [(2, 9)])]
    assert streaming.stream.cancelled  # closed on the ingress side once read


def test_admin_succeeds_if_every_replica_did_else_says_which_did_not():
    loaded = RecordingHandle(broadcasts={"admin": [wire.error(Conflict("already", code="adapter_already_loaded")), wire.ok(record("pirate"))]})
    assert asyncio.run(host(loaded).load_adapter("pirate")).name == "pirate"
    assert ("broadcast:admin", {}, ("load", "pirate")) in loaded.calls

    refused = RecordingHandle(broadcasts={"admin": [wire.error(NotFound("not loaded")), RuntimeError("replica died")]})
    with pytest.raises(DomainError) as raised:
        asyncio.run(host(refused).unload_adapter("nope"))
    assert http(raised.value).status == 404

    gone = RecordingHandle(broadcasts={"admin": [RuntimeError("replica died")]})
    with pytest.raises(DomainError) as raised:
        asyncio.run(host(gone).reload_adapter("pirate"))
    assert http(raised.value).status == 503

    # done on one replica, not on the other: not a success
    partly = RecordingHandle(broadcasts={"admin": [wire.ok(None), TimeoutError("replica busy")]})
    with pytest.raises(DomainError) as raised:
        asyncio.run(host(partly).unload_adapter("pirate"))
    assert http(raised.value).status == 503 and raised.value.code == "not_done_on_every_replica"
    assert "1 of 2 replicas" in raised.value.message and "replica #1: TimeoutError" in raised.value.message


def test_health_names_each_replicas_engines_and_an_unreachable_one():
    handle = RecordingHandle(broadcasts={"health": [("r1", {"generate": None, "classify": None}), ("r2", {"generate": "dead"}), TimeoutError("x")]})
    health = asyncio.run(host(handle).health())
    assert {k: v for k, v in health.items() if not k.startswith("replica-unreachable")} == {"r1/generate": None, "r1/classify": None, "r2/generate": "dead"}
    assert any(k.startswith("replica-unreachable") and v for k, v in health.items())


def _page(loads: float, running: float) -> str:
    registry = CollectorRegistry()
    Counter("adapterserve_adapter_loads", "Loads.", ["kind"], registry=registry).labels("lora").inc(loads)
    Gauge("vllm:num_requests_running", "Running.", ["model_name"], registry=registry).labels("m").set(running)
    Histogram("adapterserve_request_duration_seconds", "Time.", buckets=(1, 2), registry=registry).observe(1.5)
    return generate_latest(registry).decode()


def test_metrics_pages_merge_by_family_with_a_replica_label():
    own = CollectorRegistry()
    Counter("adapterserve_requests", "Requests.", ["model"], registry=own).labels("pirate").inc(7)
    Histogram("adapterserve_request_duration_seconds", "Time.", buckets=(1, 2), registry=own).observe(0.5)
    page = merge_pages(generate_latest(own), [("r1", _page(3, 2)), ("r2", _page(4, 1))]).decode()

    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert page.count("# TYPE adapterserve_request_duration_seconds histogram") == 1
    loads = {s.labels["replica"]: s.value for s in families["adapterserve_adapter_loads"].samples if s.name.endswith("_total")}
    assert loads == {"r1": 3, "r2": 4}
    running = {s.labels["replica"]: s.value for s in families["vllm:num_requests_running"].samples}
    assert sum(running.values()) == 3
    requests = [s for s in families["adapterserve_requests"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in requests] == [({"model": "pirate"}, 7)]  # the ingress's own: no replica label
    counts = {s.labels.get("replica"): s.value for s in families["adapterserve_request_duration_seconds"].samples if s.name.endswith("_count")}
    assert counts == {None: 1, "r1": 1, "r2": 1}


class _EvictingHost:
    def __init__(self):
        self.evicted: list[str] = []

    async def evict(self, name: str) -> bool:
        self.evicted.append(name)
        return True


def test_a_released_lease_evicts_its_adapter_unless_leased_again():
    from adapterserve.rayserve.replica import EngineReplica

    async def run():
        replica = object.__new__(EngineReplica)  # the lease logic without a host's engines
        replica.loop, replica.leases, replica._evicting, replica.host = asyncio.get_running_loop(), {}, set(), _EvictingHost()
        first = await replica._take_lease("pirate")
        first.__del__()  # Ray's LRU evicts the lease (Ray calls __del__ from a thread)
        await asyncio.sleep(0.05)
        assert replica.host.evicted == ["pirate"] and replica.leases == {}

        old = await replica._take_lease("french")
        new = await replica._take_lease("french")  # leased again before the old release ran
        old.__del__()
        old.__del__()  # the garbage collector may call it again
        await asyncio.sleep(0.05)
        assert replica.host.evicted == ["pirate"] and replica.leases == {"french": new}

    asyncio.run(run())
