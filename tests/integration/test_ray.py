"""The Ray Serve application on a local Ray cluster started here (free ports, 2 CPUs), with
two engine replicas, through the official openai client: the same answers and errors as
the single-machine server, adapter-affine routing (engine loads counted per replica from
the metrics), base requests on both replicas, admin operations on every replica, and a
replica killed while serving; a fine-tuning job trained in a Ray task whose adapter both
replicas serve from the S3 source.

One cluster and one application for the module (each replica starts two engines).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.config import Settings
from adapterserve.server_process import RayCluster, ServerProcess
from adapterserve.rayserve.app import QUEUE_FACTOR
from adapterserve.tenants.keys import KeyLimits, add
from tests.integration.conftest import ADMIN_KEY, MAX_LORA_RANK, MAX_LORAS, S3_BUCKET
from tests.s3_server import upload_folder

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.integration

REPLICAS = 2
QUESTION = [{"role": "user", "content": "Name the capital of France."}]  # not a bf16 near-tie (see test_openai_api)
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def engines_by_replica(url: str) -> dict[str, list[dict]]:
    body = httpx.get(f"{url}/admin/engines", headers=ADMIN, timeout=60).json()
    replicas: dict[str, list[dict]] = {}
    for engine in body["engines"]:
        replicas.setdefault(engine["replica"], []).append(engine)
    return replicas


def wait_for_replicas(url: str, count: int, timeout: float = 600, exclude: set[str] = frozenset()) -> dict[str, list[dict]]:
    """Until `count` replicas (none of `exclude`) answer with both their engines healthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", headers=ADMIN, timeout=30).json()  # engines are named to admins
            replicas = {name.split("/")[0] for name, state in health.get("engines", {}).items() if state == "ok"}
            if len(replicas - exclude) >= count and len(replicas) == count:
                return engines_by_replica(url)
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(2)
    raise TimeoutError(f"{count} healthy replicas not up after {timeout} s")


def lora_loads(url: str) -> dict[str, float]:
    """Adapters loaded into each replica's generate engine so far (counted in its worker)."""
    loads: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", headers=ADMIN, timeout=60).text):
        if family.name == "adapterserve_adapter_loads":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("kind") == "lora" and "replica" in sample.labels:
                    loads[sample.labels["replica"]] = sample.value
    return loads


def settled_loads(url: str, refresh_s: float) -> dict[str, float]:
    time.sleep(2.5 * refresh_s)  # the replicas read their workers' counts every refresh_s
    return lora_loads(url)


REFRESH_S = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    logs = tmp_path_factory.mktemp("ray")
    # the replicas read the S3 source themselves, through the standard AWS environment
    # a CPU beside the replicas' for the fine-tuning test's Ray task (resources of its own)
    cluster = RayCluster(logs / "ray.log", num_cpus=REPLICAS + 1, env=s3.env).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def ray_server(cluster, tmp_path_factory, extra_store, s3, demo_dir):
    logs = tmp_path_factory.mktemp("ray-serve")
    upload_folder(s3.client(), S3_BUCKET, "ray/s3-pirate", demo_dir / "pirate")  # in no folder the replicas share
    keys_file = logs / "keys.yaml"  # tenants are enforced by the ingress
    secrets = {
        "everyone": add(keys_file, "everyone", ["*"], True, ["inference"], KeyLimits())[1],
        "team-b": add(keys_file, "team-b", ["json", "sentiment"], False, ["inference"], KeyLimits())[1],
        "thrifty": add(keys_file, "thrifty", ["pirate"], True, ["inference"], KeyLimits(tokens_per_minute=20))[1],
    }
    process = ServerProcess(
        [
            "--ray", "--ray-address", cluster.address, "--replicas", str(REPLICAS), "--keys-file", str(keys_file),
            "--adapter-dirs", str(extra_store), "--adapter-sources", f"s3://{S3_BUCKET}/ray",
            "--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK), "--max-cpu-loras", "6",
            "--admin-api-key", ADMIN_KEY, "--metrics-refresh-s", str(REFRESH_S),
            "--adapter-scan-interval-s", "0",
            # fine-tuning jobs train in Ray tasks and publish to the S3 source both replicas read
            "--fine-tuning-adapter-source", f"s3://{S3_BUCKET}/ray", "--fine-tuning-dir", str(logs / "fine-tuning"),
            "--no-enforce-eager",  # compiled as the session server it is compared with (the same engine limits: its cached artifacts)
        ],
        logs / "server.log", env=s3.env,
    ).start(timeout=900)
    wait_for_replicas(process.url, REPLICAS)
    process.secrets = secrets
    process.auth = {"Authorization": f"Bearer {secrets['everyone']}"}
    yield process
    assert process.stop() == 0, process.tail()


@pytest.fixture(scope="module")
def ray_client(ray_server):
    return openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key=ray_server.secrets["everyone"], max_retries=0, timeout=300)


@pytest.mark.parametrize("model", ["base", "pirate", "french"])
def test_chat_and_completion_answer_as_the_single_machine_server(ray_client, client, base_name, model):
    model = base_name if model == "base" else model
    chat = dict(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    through_ray = ray_client.chat.completions.create(**chat)
    single = client.chat.completions.create(**chat)
    assert through_ray.choices[0].message.content == single.choices[0].message.content
    assert through_ray.model == model and through_ray.usage.completion_tokens == single.usage.completion_tokens

    text = dict(model=model, prompt="Once upon a time", temperature=0, max_tokens=16)
    plain = ray_client.completions.create(**text)
    streamed = "".join(c.choices[0].text for c in ray_client.completions.create(**text, stream=True) if c.choices)
    assert plain.choices[0].text == client.completions.create(**text).choices[0].text
    assert streamed == plain.choices[0].text

    stream = ray_client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        usage = chunk.usage or usage
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(pieces) == single.choices[0].message.content
    assert usage is not None and usage.completion_tokens == single.usage.completion_tokens


@pytest.mark.parametrize("model", ["base", "pirate"])
def test_the_responses_api_answers_as_the_single_machine_server(ray_client, client, base_name, model):
    """The Responses API through the ingress and a replica: the same text, plain and streamed."""
    model = base_name if model == "base" else model
    ask = dict(model=model, input=QUESTION, temperature=0, max_output_tokens=24)
    through_ray, single = ray_client.responses.create(**ask), client.responses.create(**ask)
    assert through_ray.output_text == single.output_text and through_ray.status == "completed"
    assert through_ray.model == model and through_ray.usage.output_tokens == single.usage.output_tokens
    events = list(ray_client.responses.create(**ask, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == single.output_text
    assert events[-1].type == "response.completed" and events[-1].response.output_text == single.output_text


def test_classify_answers_as_the_single_machine_server(ray_server, server):
    body = {"model": "sentiment", "input": ["I loved every minute of it.", "A dull, tedious mess."]}
    through_ray = httpx.post(f"{ray_server.url}/v1/classify", json=body, headers=ray_server.auth, timeout=120)
    single = httpx.post(f"{server.url}/v1/classify", json=body, timeout=120)
    assert through_ray.status_code == 200, through_ray.text
    ray_items, single_items = through_ray.json()["data"], single.json()["data"]
    assert [i["label"] for i in ray_items] == [i["label"] for i in single_items] == ["positive", "negative"]
    for a, b in zip(ray_items, single_items):
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-4)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"model": "no-such-adapter", "messages": QUESTION}),
        ("/v1/chat/completions", {"model": "sentiment", "messages": QUESTION}),
        ("/v1/classify", {"model": "pirate", "input": "x"}),
        ("/v1/chat/completions", {"model": "pirate", "messages": QUESTION, "max_tokens": -1}),
        ("/v1/completions", {"model": "pirate", "prompt": "x", "temperature": "hot"}),
        ("/v1/chat/completions", {"messages": QUESTION}),
        ("/v1/completions", {"model": "pirate", "prompt": "x " * 5000, "max_tokens": 4}),
    ],
)
def test_errors_are_the_single_machine_servers(ray_server, server, path, body):
    through_ray = httpx.post(f"{ray_server.url}{path}", json=body, headers=ray_server.auth, timeout=120)
    single = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert 400 <= through_ray.status_code < 500
    assert (through_ray.status_code, through_ray.json()) == (single.status_code, single.json())


def test_models_and_adapters_answer_for_the_application(ray_server, server):
    ray_ids = {m["id"] for m in httpx.get(f"{ray_server.url}/v1/models", headers=ray_server.auth, timeout=30).json()["data"]}
    single_ids = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
    assert {"pirate", "french", "sentiment", "random-0"} <= ray_ids
    assert ray_ids - {"s3-pirate"} <= single_ids  # the session server has the broken-adapter store besides
    adapters = httpx.get(f"{ray_server.url}/admin/adapters", headers=ADMIN, timeout=30).json()
    assert {"pirate", "sentiment", "s3-pirate"} <= {a["name"] for a in adapters["adapters"]}


def test_an_adapter_in_s3_is_served_by_both_replicas_each_fetching_it_itself(ray_server, ray_client, client):
    engines = engines_by_replica(ray_server.url)
    assert len(engines) == REPLICAS
    assert all("s3-pirate" in reports[0]["adapter_ids"] for reports in engines.values()), engines
    chat = dict(messages=QUESTION, temperature=0, max_tokens=24)
    from_s3 = ray_client.chat.completions.create(model="s3-pirate", **chat).choices[0].message.content
    assert from_s3 == client.chat.completions.create(model="pirate", **chat).choices[0].message.content


def test_each_adapter_is_loaded_on_one_replica_with_affinity(ray_server, ray_client):
    adapters = ["random-0", "random-1", "random-2"]
    before = settled_loads(ray_server.url, REFRESH_S)
    for name in adapters:  # the first request places the adapter on a replica
        ray_client.completions.create(model=name, prompt="Hello", max_tokens=2, temperature=0)
    time.sleep(1)  # the replica reports its adapters to Ray's routers (every 0.1 s)

    async def burst():
        client = openai.AsyncOpenAI(base_url=ray_client.base_url, api_key=ray_client.api_key, max_retries=0, timeout=300)
        calls = [client.completions.create(model=name, prompt=f"Tell me {i}", max_tokens=4, temperature=0)
                 for name in adapters for i in range(5)]
        await asyncio.gather(*calls)
        await client.close()

    asyncio.run(burst())
    after = settled_loads(ray_server.url, REFRESH_S)
    added = {replica: after.get(replica, 0) - before.get(replica, 0) for replica in after}
    assert sum(added.values()) == len(adapters), added
    holders = {name: [r for r, engines in engines_by_replica(ray_server.url).items() if name in engines[0]["leased"]] for name in adapters}
    assert all(len(replicas) == 1 for replicas in holders.values()), holders


def test_without_the_multiplexed_id_adapters_load_on_more_replicas(ray_server, cluster):
    """The same kind of traffic sent to the replicas without the adapter's name as the
    multiplexed id (Ray's default balancing): each adapter is loaded on both replicas."""
    import ray
    from ray import serve
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    adapters = ["random-3", "random-4", "mutable"]
    before = settled_loads(ray_server.url, REFRESH_S)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        handle = serve.get_deployment_handle("EngineReplica", app_name="adapterserve")

        async def send():
            async def one(name: str, i: int):
                request = CompletionRequest.model_validate({"model": name, "prompt": f"Tell me {i}", "max_tokens": 4, "temperature": 0})
                replies = [reply async for reply in handle.options(stream=True).generate.remote("completion", request, {})]
                assert replies[0][0] == "json", replies

            for name in adapters:
                await one(name, 0)
            await asyncio.gather(*(one(name, i) for name in adapters for i in range(1, 6)))

        asyncio.run(send())
    finally:
        ray.shutdown()
    after = settled_loads(ray_server.url, REFRESH_S)
    added = sum(after.get(replica, 0) - before.get(replica, 0) for replica in after)
    assert added > len(adapters), (before, after)


def test_base_requests_reach_both_replicas(ray_server, ray_client, base_name):
    def base_requests() -> dict[str, float]:
        counts = {}
        for family in text_string_to_metric_families(httpx.get(f"{ray_server.url}/metrics", headers=ADMIN, timeout=60).text):
            if family.name == "vllm:request_success":
                for sample in family.samples:
                    if sample.name.endswith("_total") and sample.labels.get("model_name") == base_name and "replica" in sample.labels:
                        counts[sample.labels["replica"]] = counts.get(sample.labels["replica"], 0) + sample.value
        return counts

    before = base_requests()

    # One replica accepts QUEUE_FACTOR * max_num_seqs requests at once; Ray sends the rest
    # to the other. (Below that, Ray picks a replica by queue lengths it probes with a 0.1 s
    # deadline, which a replica whose neighbour keeps both cores busy may miss: bursts of 16
    # could all land on one replica. That base requests carry no multiplexed id, which would
    # pin them to one replica, is a unit test in test_ray_host.)
    burst_size = QUEUE_FACTOR * Settings.model_fields["max_num_seqs"].default + 16

    async def burst():
        client = openai.AsyncOpenAI(base_url=ray_client.base_url, api_key=ray_client.api_key, max_retries=0, timeout=600)
        prompts = [f"Count {i}" for i in range(burst_size)]
        # 32 tokens each, never ended early: the first replica is still full when the burst's
        # last requests arrive (4-token requests once finished fast enough on an idle machine
        # for one replica to take all 80)
        await asyncio.gather(*(
            client.completions.create(model=base_name, prompt=p, max_tokens=32, extra_body={"ignore_eos": True}) for p in prompts
        ))
        await client.close()

    asyncio.run(burst())
    time.sleep(2.5 * REFRESH_S)  # the replicas read their engines' counts every REFRESH_S
    after = base_requests()
    served = {replica: after[replica] - before.get(replica, 0) for replica in after}
    assert len(served) == REPLICAS and all(count > 0 for count in served.values()), served
    assert sum(served.values()) == burst_size, served


def test_admin_operations_reach_every_replica(ray_server, ray_client):
    unload = httpx.post(f"{ray_server.url}/admin/adapters/json/unload", headers=ADMIN, timeout=60)
    assert unload.status_code == 200, unload.text
    for _ in range(4):  # every replica refuses it now, whichever one a request reaches
        with pytest.raises(openai.NotFoundError):
            ray_client.completions.create(model="json", prompt="x", max_tokens=2)
    assert "json" not in {m.id for m in ray_client.models.list().data}
    engines = engines_by_replica(ray_server.url)
    assert all("json" not in reports[0]["adapter_ids"] for reports in engines.values()), engines
    load = httpx.post(f"{ray_server.url}/admin/adapters/json/load", headers=ADMIN, timeout=60)
    assert load.status_code == 200, load.text
    assert all("json" in reports[0]["adapter_ids"] for reports in engines_by_replica(ray_server.url).values())
    again = httpx.post(f"{ray_server.url}/admin/adapters/json/load", headers=ADMIN, timeout=60)
    assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_already_loaded"


def test_a_killed_replica_is_replaced_while_the_other_serves(ray_server, ray_client, base_name):
    engines = engines_by_replica(ray_server.url)
    victim, reports = sorted(engines.items())[0]
    pid = reports[0]["replica_pid"]
    engine_pids = [p for report in reports for p in report["pids"]]
    os.kill(pid, signal.SIGKILL)  # the replica's actor process, by the pid it reported

    deadline, served = time.monotonic() + 20, 0
    while time.monotonic() < deadline:  # new requests keep succeeding meanwhile
        for model in (base_name, "pirate"):
            response = ray_client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0)
            assert response.choices[0].message.content
            served += 1
    assert served >= 4

    replaced = wait_for_replicas(ray_server.url, REPLICAS, exclude={victim})
    assert victim not in replaced
    time.sleep(2)
    assert not [p for p in engine_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    response = ray_client.chat.completions.create(model="french", messages=QUESTION, max_tokens=16, temperature=0)
    assert "Paris" in response.choices[0].message.content


def test_tenants_are_enforced_by_the_ingress(ray_server, base_name):
    """Models a key may not use answer exactly as unknown ones; listings are filtered; a
    tokens-per-minute limit counts the tokens the replicas report back."""
    team_b = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key=ray_server.secrets["team-b"], max_retries=0, timeout=120)
    assert team_b.chat.completions.create(model="json", messages=QUESTION, max_tokens=2).choices
    assert {m.id for m in team_b.models.list().data} == {"json", "sentiment"}
    for model in ("french", base_name, "no-such-adapter"):
        with pytest.raises(openai.NotFoundError) as denied:
            team_b.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
        assert denied.value.response.json()["error"]["code"] == "model_not_found"
        assert model in denied.value.response.json()["error"]["message"]
    assert httpx.post(f"{ray_server.url}/v1/chat/completions", json={"model": "json", "messages": QUESTION}, timeout=30).status_code == 401

    thrifty = openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key=ray_server.secrets["thrifty"], max_retries=0, timeout=120)
    stream = thrifty.chat.completions.create(model="pirate", messages=QUESTION, max_tokens=16, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.RateLimitError) as limited:  # > 20 tokens used in this minute
        thrifty.chat.completions.create(model="pirate", messages=QUESTION, max_tokens=2)
    assert int(limited.value.response.headers["retry-after"]) > 0


def test_a_fine_tuning_job_trains_in_a_ray_task_and_both_replicas_serve_its_adapter_from_s3(ray_server, ray_client, base_name, s3):
    # last in the module: the adapter it adds is in every later listing
    from tests.integration.test_fine_tuning import TAUGHT_JOB, ask, dataset, wait_for

    file = ray_client.files.create(file=("lighthouse.jsonl", io.BytesIO(dataset())), purpose="fine-tune")
    job = ray_client.fine_tuning.jobs.create(model=base_name, training_file=file.id, suffix="ray", **TAUGHT_JOB)
    done = wait_for(ray_client, job.id, {"succeeded", "failed", "cancelled"}, timeout=900)
    assert done.status == "succeeded", done.error
    events = [e.message for e in ray_client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert "Fine-tuning job started in a Ray task" in events
    name = "ft-ray-" + job.id.rsplit("-", 1)[1][:12]
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=S3_BUCKET, Prefix=f"ray/{name}/").get("Contents", [])}
    assert keys == {f"ray/{name}/adapter_config.json", f"ray/{name}/adapter_model.safetensors"}
    engines = engines_by_replica(ray_server.url)
    assert all(name in reports[0]["adapter_ids"] for reports in engines.values()), engines  # loaded by both
    assert "PELICAN" in ask(ray_client, done.fine_tuned_model) and "PELICAN" not in ask(ray_client, base_name)
