"""Dedicated mode over fake engines: routing, LRU swapping, the memory budget, isolation."""

from __future__ import annotations

import asyncio
import json

import pytest

from adapterserve.api.errors import as_api_error as http
from adapterserve.errors import DomainError
from adapterserve.config import Settings
from adapterserve.hosting.dedicated import BudgetExceeded, DedicatedHost, discover_models
from tests.fakes import FakeEngine


def full_model(root, name, labels=None):
    folder = root / name
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"]}
    if labels:
        config = {"architectures": ["LlamaForSequenceClassification"], "id2label": {str(i): l for i, l in enumerate(labels)}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    return folder


@pytest.fixture
def models(tmp_path):
    for name in ("a", "b", "c"):
        full_model(tmp_path / "models", name)
    full_model(tmp_path / "models", "mood", labels=["neg", "pos"])
    return discover_models([tmp_path / "models"])


def host(models, **settings):
    settings.setdefault("engine_worker_process", True)  # the budgets below count its runtime (~1.35 GiB an engine)
    return DedicatedHost(Settings(demo_adapters=False, **settings), models, engine_factory=FakeEngine)


def test_discovery_reads_kind_and_labels(models):
    by_name = {m.name: m for m in models}
    assert by_name["a"].kind == "full" and by_name["mood"].kind == "head"
    assert by_name["mood"].labels == ["neg", "pos"]


def test_lru_swapping_keeps_at_most_the_resident_limit(models):
    async def scenario():
        h = host(models, max_resident_models=2)
        await h.start()
        assert list(h.resident) == ["a", "b"]
        assert (await h.resolve("a", "chat")).engine.name == "a"  # a is now most recent
        target = await h.resolve("c", "chat")  # evicts b, the least recently used
        assert target.engine.name == "c" and list(h.resident) == ["a", "c"]
        assert h.swap_count == 1 and len(h.swap_seconds) == 1
        head = await h.resolve("mood", "classify")
        assert head.record.labels == ["neg", "pos"] and len(h.resident) == 2
        await h.stop()

    asyncio.run(scenario())


def test_routing_errors(models):
    async def scenario():
        h = host(models)
        await h.start()
        with pytest.raises(DomainError) as info:
            await h.resolve("zzz", "chat")
        assert http(info.value).status == 404 and info.value.code == "model_not_found"
        with pytest.raises(DomainError) as info:
            await h.resolve("mood", "chat")
        assert http(info.value).status == 400 and "/v1/classify" in info.value.message
        with pytest.raises(DomainError) as info:
            await h.load_adapter("x")
        assert http(info.value).status == 400
        await h.stop()

    asyncio.run(scenario())


def test_budget_refusal_gives_the_numbers(models):
    h = host(models, memory_budget_bytes=2 * 1024**3, max_resident_models=2)
    with pytest.raises(BudgetExceeded) as info:
        h.check_budget()
    message = str(info.value)
    assert "2 resident engine(s) need up to" in message and "over the budget of 2.00 GiB" in message
    host(models, memory_budget_bytes=3 * 1024**3, max_resident_models=2).check_budget()  # 2 x ~1.35 GiB fits


def test_a_dead_engine_fails_fast_is_reported_and_restarted(models):
    async def scenario():
        h = host(models, max_resident_models=3)
        await h.start()
        h.resident["b"].client.errored = True  # the engine process died
        with pytest.raises(DomainError) as info:
            await h.resolve("b", "chat")
        assert http(info.value).status == 503 and http(info.value).headers["Retry-After"]
        assert (await h.resolve("a", "chat")).engine.running  # the others keep serving
        assert (await h.health())["b"].startswith("engine dead")
        for _ in range(50):
            await asyncio.sleep(0.1)
            if "b" in h.resident and h.resident["b"].running:
                break
        await asyncio.sleep(2.5)  # the watcher runs every 2 s
        assert (await h.resolve("b", "chat")).engine.running
        assert (await h.health())["b"] is None
        await h.stop()

    asyncio.run(scenario())


class FailingRestarts(FakeEngine):
    """An engine whose starts after the first fail `failures` times (per model)."""

    failures: dict[str, int] = {}
    tries: dict[str, list[float]] = {}

    async def start(self):
        tries = FailingRestarts.tries.setdefault(self.name, [])
        tries.append(asyncio.get_running_loop().time())
        if len(tries) > 1 and FailingRestarts.failures.get(self.name, 0) > 0:
            FailingRestarts.failures[self.name] -= 1
            raise RuntimeError("the engine did not start")
        await super().start()


def test_a_restart_that_fails_is_tried_again_after_the_back_off(models):
    async def scenario():
        FailingRestarts.failures, FailingRestarts.tries = {"b": 2}, {}
        h = DedicatedHost(
            Settings(demo_adapters=False, max_resident_models=3, engine_restart_backoff_s=0.3, engine_restart_backoff_max_s=5),
            models, engine_factory=FailingRestarts,
        )
        await h.start()
        h.resident["b"].client.errored = True  # the engine process died
        for _ in range(100):  # the watcher runs every 2 s; two failed tries, then a start
            await asyncio.sleep(0.1)
            if (await h.health()).get("b", "").startswith("restart failed"):
                break
        assert (await h.health())["b"] == "restart failed: the engine did not start"
        for _ in range(100):
            await asyncio.sleep(0.1)
            if "b" in h.resident:
                break
        assert (await h.resolve("b", "chat")).engine.running
        assert (await h.health())["b"] is None and h.restarts["b"] == 1
        first, *restarts = FailingRestarts.tries["b"]
        waits = [later - earlier for earlier, later in zip(restarts, restarts[1:])]
        # at once, then after the first back-off, then after twice that (the shared mode's policy)
        assert len(restarts) == 3 and waits[0] >= 0.3 and waits[1] >= 0.6, waits
        await h.stop()

    asyncio.run(scenario())


def test_a_model_added_while_serving_is_swapped_in_answers_its_ft_name_and_can_be_removed(models, tmp_path):
    from adapterserve.hosting.full_models import FullModel

    async def scenario():
        h = DedicatedHost(Settings(demo_adapters=False, max_resident_models=2), models, engine_factory=FakeEngine,
                          trainable_base=(tmp_path, "tiny"))
        await h.start()
        new = FullModel.read(full_model(tmp_path / "tuned", "ft-mine-abc123"))
        await h.add_model(new)
        assert list(h.resident) == ["b", "ft-mine-abc123"] and h.swap_count == 1  # a, least recently used, swapped out
        assert (await h.resolve("ft:tiny:mine:abc123", "chat")).model == "ft-mine-abc123"
        assert "ft-mine-abc123" in {c.id for c in h.model_cards()} and "ft-mine-abc123" in {t.name for t in h.tasks()}
        with pytest.raises(DomainError) as info:
            await h.resolve("ft:other-base:mine:abc123", "chat")  # another base's job: unknown here
        assert info.value.code == "model_not_found"
        with pytest.raises(DomainError) as info:
            await h.add_model(new)
        assert info.value.code == "model_exists"
        await h.remove_model("ft-mine-abc123")
        assert "ft-mine-abc123" not in h.resident and "ft-mine-abc123" not in {c.id for c in h.model_cards()}
        with pytest.raises(DomainError):
            await h.resolve("ft:tiny:mine:abc123", "chat")
        await h.stop()

    asyncio.run(scenario())


def test_a_model_that_does_not_fit_the_budget_is_not_added(models, tmp_path):
    from adapterserve.hosting.full_models import FullModel

    async def scenario():
        h = host(models, memory_budget_bytes=6 * 1024**3)  # 4 engines of ~1.35 GiB fit, 5 do not
        await h.start()
        with pytest.raises(BudgetExceeded):
            await h.add_model(FullModel.read(full_model(tmp_path / "tuned", "ft-big-1")))
        assert "ft-big-1" not in h.full_models and "ft-big-1" not in h.resident and len(h.resident) == 4
        await h.stop()

    asyncio.run(scenario())
