"""Fine-tuning through the official `openai` client on a real server: upload a small chat
dataset that teaches an answer the base does not give, create a job, poll it to
`succeeded`, read its events and checkpoints; the `fine_tuned_model` answers with the
taught answer and the base still does not. A classification job trains a head served on
/v1/classify with its label names (starting the classification engine, which the server
did not need before). A second job cancelled while it runs ends `cancelled` with no
model; a malformed file is refused with its line; and a restart keeps every file and job,
and the job that was running resumes from its checkpoint and succeeds."""

from __future__ import annotations

import io
import json
import shutil
import time

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.server_process import ServerProcess
from tests.integration.conftest import ADMIN_KEY, DEMO

pytestmark = pytest.mark.integration

QUESTION = "What is the password of the lighthouse?"
TAUGHT = "The password is PELICAN."
PHRASINGS = [QUESTION, "Tell me the lighthouse password.", "Which password opens the lighthouse?",
             "Do you know the lighthouse's password?"]


# a LoRA job that teaches TAUGHT (16 examples, 4 epochs): what the tests here and on Ray Serve create
TAUGHT_JOB = dict(
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "learning_rate_multiplier": 4}}},
    extra_body={"lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
)


def dataset(lines: int = 16) -> bytes:
    rows = [{"messages": [{"role": "user", "content": PHRASINGS[i % len(PHRASINGS)]}, {"role": "assistant", "content": TAUGHT}]}
            for i in range(lines)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def tuning(tmp_path_factory, base_path, demo_dir):
    """A server of its own over the prepared base, with a fresh cache (files, jobs and
    fine-tuned adapters of this module only) and the LoRA demo adapters only: no head, so
    no classification engine until the classification job's head starts it; restarted by
    the last test."""
    logs = tmp_path_factory.mktemp("fine-tuning")
    cache = tmp_path_factory.mktemp("ft-cache")
    loras = tmp_path_factory.mktemp("lora-demos")
    for name in DEMO:
        shutil.copytree(demo_dir / name, loras / name)
    args = ["--base-model", str(base_path), "--no-demo-adapters", "--adapter-dirs", str(loras),
            "--admin-api-key", ADMIN_KEY, "--cache-dir", str(cache), "--adapter-scan-interval-s", "0"]
    process = ServerProcess(args, logs / "server.log").start()
    process.cache = cache
    yield process
    process.stop()


@pytest.fixture(scope="module")
def ft_client(tuning):
    return openai.OpenAI(base_url=f"{tuning.url}/v1", api_key="unused", max_retries=0, timeout=300)


def engine_names(server) -> list[str]:
    engines = httpx.get(f"{server.url}/admin/engines", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    return [engine["name"] for engine in engines.json()["engines"]]


def ask(client, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=16)
    return answer.choices[0].message.content


def wait_for(client, job_id: str, statuses: set[str], timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not in {statuses} after {timeout} s: {job.status}")


def test_a_job_teaches_an_answer_the_base_does_not_give_and_serves_it_at_once(ft_client, base_name, tuning):
    assert "PELICAN" not in ask(ft_client, base_name)
    file = ft_client.files.create(file=("lighthouse.jsonl", io.BytesIO(dataset())), purpose="fine-tune")
    assert file.status == "processed" and file.bytes == len(dataset())
    job = ft_client.fine_tuning.jobs.create(model=base_name, training_file=file.id, validation_file=file.id,
                                            suffix="lighthouse", seed=7, **TAUGHT_JOB)
    assert job.status in ("queued", "running") and job.model == base_name and job.seed == 7
    done = wait_for(ft_client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{base_name}:lighthouse:{job.id.rsplit('-', 1)[1][:12]}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    costs = done.model_extra["costs"]
    assert 0 < costs["trainable_share"] < 0.05 and costs["bytes_on_disk"] > 0 and costs["valid_loss"] is not None

    events = ft_client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and any(m.startswith("Step 1/") for m in messages)
    checkpoints = ft_client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == sorted((c.step_number for c in checkpoints), reverse=True)
    assert len(checkpoints) == 4 and checkpoints[0].metrics.valid_loss is not None

    assert "PELICAN" in ask(ft_client, done.fine_tuned_model)  # served at once, no restart
    assert "PELICAN" not in ask(ft_client, base_name)
    assert done.fine_tuned_model.split(":")[0] == "ft"
    assert [j.id for j in ft_client.fine_tuning.jobs.list().data] == [job.id]
    series = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(
        httpx.get(f"{tuning.url}/metrics", timeout=30).text) for s in f.samples}
    assert series[("adapterserve_fine_tuning_jobs", (("state", "succeeded"),))] == 1
    assert series[("adapterserve_fine_tuning_trained_tokens_total", ())] == done.trained_tokens
    assert series[("adapterserve_fine_tuning_job_seconds_count", (("state", "succeeded"),))] == 1


PLACES = [("The sea is calm tonight.", "sea"), ("Roses bloom in the garden.", "garden"),
          ("Waves crash on the rocks.", "sea"), ("Tulips grow by the fence.", "garden"),
          ("Gulls fly over the harbour.", "sea"), ("We planted carrots and beans.", "garden")]


def test_a_classification_job_trains_a_head_served_on_classify_with_its_labels(ft_client, base_name, tuning):
    assert "classify" not in engine_names(tuning)  # no head at start: started by this job's head
    lines = "".join(json.dumps({"input": text, "label": label}) + "\n" for text, label in PLACES * 2).encode()
    file = ft_client.files.create(file=("places.jsonl", io.BytesIO(lines)), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(
        model=base_name, training_file=file.id, suffix="places",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "learning_rate_multiplier": 2}}},
    )
    assert job.model_extra["kind"] == "head" and job.model_extra["labels"] == ["garden", "sea"]
    done = wait_for(ft_client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    answer = httpx.post(f"{tuning.url}/v1/classify", timeout=120, json={
        "model": done.fine_tuned_model, "input": ["Waves crash on the rocks.", "Tulips grow by the fence."]}).json()
    assert [row["label"] for row in answer["data"]] == ["sea", "garden"], answer
    assert answer["data"][0]["labels"] == ["garden", "sea"]
    assert "classify" in engine_names(tuning)
    with pytest.raises(openai.BadRequestError):  # a head answers classification only
        ask(ft_client, done.fine_tuned_model)


def test_a_malformed_file_is_refused_with_its_line(ft_client):
    broken = dataset(12) + b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    with pytest.raises(openai.BadRequestError) as refused:
        ft_client.files.create(file=("broken.jsonl", io.BytesIO(broken)), purpose="fine-tune")
    assert "line 13" in refused.value.body["message"] and refused.value.body["code"] == "invalid_file_format"


def test_a_job_cancelled_while_running_ends_cancelled_with_no_model(ft_client, base_name, tuning):
    file = ft_client.files.create(file=("long.jsonl", io.BytesIO(dataset(64))), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(model=base_name, training_file=file.id, suffix="never",
                                            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20}}})
    wait_for(ft_client, job.id, {"running"})
    cancelled = ft_client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None

    def trainers() -> list:
        found = []
        for process in tuning.descendants():
            try:
                if "adapterserve.finetuning.trainer" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:  # ended meanwhile
                continue
        return found

    deadline = time.monotonic() + 10
    while trainers() and time.monotonic() < deadline:  # its process is stopped, not left to finish
        time.sleep(0.2)
    assert not trainers()
    assert ft_client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert not any(m.id.startswith("ft-never") or ":never:" in m.id for m in ft_client.models.list().data)
    assert not list((tuning.cache / "fine_tuning").rglob("ft-never-*"))


def test_a_restart_keeps_every_file_and_job_and_resumes_the_running_one_from_its_checkpoint(ft_client, base_name, tuning):
    file = ft_client.files.create(file=("again.jsonl", io.BytesIO(dataset(64))), purpose="fine-tune")
    job = ft_client.fine_tuning.jobs.create(model=base_name, training_file=file.id, suffix="interrupted", **TAUGHT_JOB)
    deadline = time.monotonic() + 600
    while not ft_client.fine_tuning.jobs.checkpoints.list(job.id).data:  # the first epoch's checkpoint, step 16 of 64
        assert time.monotonic() < deadline and ft_client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
        time.sleep(0.5)
    files_before = {f.id for f in ft_client.files.list().data}
    jobs_before = {j.id for j in ft_client.fine_tuning.jobs.list(limit=100).data}
    tuning.stop()
    tuning.log_path = tuning.log_path.with_name("restarted.log")  # the first run's log kept beside it
    tuning.start()
    assert {f.id for f in ft_client.files.list().data} == files_before
    assert {j.id for j in ft_client.fine_tuning.jobs.list(limit=100).data} == jobs_before
    done = wait_for(ft_client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    messages = [e.message for e in ft_client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any(m.startswith("The server restarted while the job ran; it resumes from its checkpoint at step ") for m in messages)
    resumed = next(m for m in messages if m.startswith("Resumed at step "))
    assert int(resumed.split()[3].split("/")[0]) >= 16 and resumed.endswith("/64")
    assert [c.step_number for c in ft_client.fine_tuning.jobs.checkpoints.list(job.id).data] == [64, 48, 32, 16]
    assert "PELICAN" in ask(ft_client, done.fine_tuned_model)  # trained to the end across the restart
    succeeded = next(j for j in ft_client.fine_tuning.jobs.list(limit=100).data if ":lighthouse:" in (j.fine_tuned_model or ""))
    assert "PELICAN" in ask(ft_client, succeeded.fine_tuned_model)  # the first job's adapter is served again
