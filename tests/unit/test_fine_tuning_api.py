"""The files and fine-tuning jobs API over fake engines, through the official `openai`
client's own request shapes (multipart upload, JSON bodies): files stored, listed, read
back and deleted; a malformed training file refused with its line; jobs refused before
anything reaches a trainer (unknown base, bad suffix, hyperparameters, modules, files);
and what is stored survives a new store over the same folder (a restart)."""

from __future__ import annotations

import json

import pytest

from adapterserve.finetuning.store import FineTuningStore

GOOD = "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                          {"role": "assistant", "content": f"Answer {i}."}]}) for i in range(12)) + "\n"


def upload(client, text: str, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return client.post("/v1/files", files={"file": (name, text.encode(), "application/jsonl")}, data={"purpose": purpose})


def test_files_are_stored_listed_read_back_and_deleted(client):
    created = upload(client, GOOD)
    assert created.status_code == 200, created.text
    file = created.json()
    assert file["object"] == "file" and file["purpose"] == "fine-tune" and file["bytes"] == len(GOOD.encode())
    assert file["status"] == "processed" and file["filename"] == "train.jsonl"
    assert [f["id"] for f in client.get("/v1/files").json()["data"]] == [file["id"]]
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert client.get(f"/v1/files/{file['id']}/content").text == GOOD
    deleted = client.delete(f"/v1/files/{file['id']}")
    assert deleted.json() == {"id": file["id"], "object": "file", "deleted": True}
    missing = client.get(f"/v1/files/{file['id']}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"


@pytest.mark.parametrize("text, expected", [
    ("not json\n", "line 1: not a JSON object"),
    (GOOD + '{"prompt": "old format"}\n', "line 13: no 'messages'"),
    (GOOD + '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "line 13: message 0 has role 'robot'"),
    (GOOD + '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}\n', "line 13: the last message must be"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', "at least 10 are needed"),
])
def test_a_malformed_training_file_is_refused_with_its_line_and_reason(client, text, expected):
    refused = upload(client, text)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "invalid_file_format" and expected in error["message"] and error["param"] == "file"
    assert client.get("/v1/files").json()["data"] == []


def test_uploads_over_the_limits_and_other_purposes_are_refused(make_client):
    client = make_client(fine_tuning_max_file_bytes=100)
    too_big = upload(client, GOOD)
    assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "file_too_large"
    huge = client.post("/v1/files", content=b"x" * 200_000, headers={"content-type": "multipart/form-data; boundary=b"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"

    def streamed():  # no Content-Length: the limit holds as the body streams in
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(8):
            yield b"x" * 60_000
    chunked = client.post("/v1/files", content=streamed(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    other = upload(client, GOOD[:50], purpose="batch")
    assert other.status_code == 400 and other.json()["error"]["code"] == "invalid_purpose"


@pytest.mark.parametrize("change, code, param", [
    ({"model": "no-such-base"}, "model_not_found", "model"),
    ({"suffix": "has spaces"}, "invalid_suffix", "suffix"),
    ({"method": {"type": "dpo"}}, "unsupported_method", "method"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, "invalid_hyperparameter", "n_epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "many"}}}}, "invalid_hyperparameter", "batch_size"),
    ({"lora": {"target_modules": ["no_such_proj"]}}, "invalid_lora", "lora.target_modules"),
    ({"lora": {"rank": 1000}}, "invalid_hyperparameter", "rank"),
    ({"training_file": "file-unknown"}, "invalid_file", "training_file"),
    ({"seed": -1}, "invalid_seed", "seed"),
    ({"metadata": {"k": ["not", "a", "string"]}}, "invalid_metadata", "metadata"),
])
def test_a_bad_job_is_refused_before_anything_is_queued(client, tiny_base, change, code, param):
    file_id = upload(client, GOOD).json()["id"]
    body = {"model": tiny_base.name, "training_file": file_id, **change}
    refused = client.post("/v1/fine_tuning/jobs", json=body)
    assert refused.status_code in (400, 404), refused.text
    error = refused.json()["error"]
    assert error["code"] == code and error["param"] == param
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_a_job_on_a_file_with_a_bad_line_is_refused_with_the_line(client, tiny_base):
    fine_tuning = client.app.state.fine_tuning
    staged = fine_tuning.store.root / ".upload-test"
    staged.write_text(GOOD + "{broken\n")  # stored as is (an older server's upload), checked again at job time
    row = fine_tuning.store.add_file("", "old.jsonl", "fine-tune", staged, staged.stat().st_size, "processed", None)
    refused = client.post("/v1/fine_tuning/jobs", json={"model": tiny_base.name, "training_file": row["id"]})
    assert refused.status_code == 400 and "line 13" in refused.json()["error"]["message"]


def test_files_jobs_and_events_survive_a_new_store_over_the_same_folder(tmp_path):
    store = FineTuningStore(tmp_path / "ft")
    staged = tmp_path / "ft" / ".upload"
    staged.write_text(GOOD)
    file = store.add_file("team-a", "train.jsonl", "fine-tune", staged, len(GOOD), "processed", None)
    job = store.add_job("team-a", {"model": "base", "training_file": file["id"], "resolved": {}}, "running")
    store.add_event(job["id"], "Step 1/3", data={"step": 1}, kind="metrics")
    store.add_checkpoint(job["id"], 3, {"train_loss": 0.5}, tmp_path / "ckpt")
    again = FineTuningStore(tmp_path / "ft")
    assert again.file("team-a", file["id"]) == file and again.file_path(file["id"]).read_text() == GOOD
    assert again.job("team-a", job["id"])["status"] == "running"
    assert again.events(job["id"])[0]["data"] == {"step": 1}
    assert again.checkpoints(job["id"])[0]["metrics"] == {"train_loss": 0.5}
    assert again.file("team-b", file["id"]) is None and again.job("team-b", job["id"]) is None  # other tenants


def test_tenants_see_only_their_files_jobs_and_fine_tuned_models(settings, registry, tiny_base, store, tmp_path):
    """With a keys file: team-a's file, job and the model it produced are team-a's alone;
    team-b (even with models ["*"]) gets them answered as unknown, and team-a uses its model
    with no edit to the keys file."""
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.tenants.keys import KeyLimits, add
    from tests.adapter_factory import write_lora
    from tests.fakes import FakeEngine
    from tests.unit.conftest import LOCAL

    keys_file = tmp_path / "keys.yaml"
    _, team_a = add(keys_file, "team-a", ["alpha"], True, ["inference"], KeyLimits())
    _, team_b = add(keys_file, "team-b", ["*"], True, ["inference"], KeyLimits())
    app = create_app(settings.model_copy(update={"keys_file": keys_file}), host_factory=lambda s, observer: SharedBaseHost(
        s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    with TestClient(app, base_url=LOCAL) as client:
        a, b = ({"authorization": f"Bearer {secret}"} for secret in (team_a, team_b))
        file = client.post("/v1/files", headers=a, files={"file": ("t.jsonl", GOOD.encode())}, data={"purpose": "fine-tune"}).json()
        assert client.get(f"/v1/files/{file['id']}", headers=b).status_code == 404
        assert client.get("/v1/files", headers=b).json()["data"] == []
        assert client.get(f"/v1/files/{file['id']}/content", headers=b).status_code == 404
        assert client.delete(f"/v1/files/{file['id']}", headers=b).status_code == 404

        # a job of team-a that succeeded: its adapter is in a store and registered, owned by team-a
        fine_tuning = client.app.state.fine_tuning
        job = fine_tuning.store.add_job("team-a", {"model": tiny_base.name, "training_file": file["id"], "suffix": "mine",
                                                   "hyperparameters": {}, "resolved": {"seed": 0, "rank": 4, "alpha": 8, "target_modules": ["q_proj"]}}, "succeeded")
        name = f"ft-mine-{job['id'].rsplit('-', 1)[1][:12]}"
        write_lora(store / name, tiny_base, rank=4)
        fine_tuning.store.update_job(job["id"], adapter=name, fine_tuned_model=f"ft:{tiny_base.name}:mine:x")
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=b).status_code == 404
        assert client.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
        assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", headers=a).json()["data"]] == [job["id"]]

        ft_model = f"ft:{tiny_base.name}:mine:{job['id'].rsplit('-', 1)[1][:12]}"
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        mine = client.post("/v1/chat/completions", headers=a, json={"model": ft_model, **chat})
        assert mine.status_code == 200, mine.text
        assert mine.json()["choices"][0]["message"]["content"] == f"answer from {name}"
        for model in (ft_model, name):
            theirs = client.post("/v1/chat/completions", headers=b, json={"model": model, **chat})
            assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "model_not_found"
        assert name in {m["id"] for m in client.get("/v1/models", headers=a).json()["data"]}
        assert name not in {m["id"] for m in client.get("/v1/models", headers=b).json()["data"]}


def test_an_example_over_the_context_is_refused_with_its_line(tmp_path):
    from adapterserve.finetuning.datasets import DatasetInvalid, check_lengths, read_chat_file

    class Words:  # a tokenizer of one token per word, with the chat template's shape
        def apply_chat_template(self, messages, tokenize=True):
            return [0] * sum(len(m["content"].split()) for m in messages)

    path = tmp_path / "long.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "ok"}]}
    path.write_text(GOOD + "\n" + json.dumps(long) + "\n")  # a blank line before it: line 14
    dataset = read_chat_file(path)
    assert check_lengths(dataset, Words(), 100) == 12 * 4 + 51
    with pytest.raises(DatasetInvalid, match="line 14: the example is 51 tokens, over the context of 40"):
        check_lengths(dataset, Words(), 40)


@pytest.mark.parametrize("text, expected", [
    ('{"input": "a", "label": "x"}\n' * 12, "at least two labels"),
    ('{"input": "a", "label": "x"}\n' + GOOD, "line 2: a chat example in a file of classification examples"),
    ('{"input": "", "label": "x"}\n', "line 1: 'input' must be non-empty text"),
    ('{"input": "a", "label": 3}\n', "line 1: 'label' must be a name"),
])
def test_classification_files_are_checked_too(client, text, expected):
    refused = upload(client, text)
    assert refused.status_code == 400 and expected in refused.json()["error"]["message"], refused.text


def test_a_classification_file_is_accepted_with_its_labels(tmp_path):
    from adapterserve.finetuning.datasets import read_chat_file

    path = tmp_path / "places.jsonl"
    path.write_text("".join(json.dumps({"input": f"text {i}", "label": ["sea", "garden"][i % 2]}) + "\n" for i in range(10)))
    dataset = read_chat_file(path)
    assert dataset.kind == "classification" and dataset.labels == ["garden", "sea"] and dataset.count == 10


def dedicated_client(settings, tiny_base, tmp_path, trainable: bool):
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.dedicated import DedicatedHost
    from adapterserve.hosting.full_models import FullModel
    from tests.fakes import FakeEngine
    from tests.unit.conftest import LOCAL
    import shutil

    folder = shutil.copytree(tiny_base.path, tmp_path / "models" / "task-a")  # real safetensors: the metrics read them
    models = [FullModel.read(folder)]
    base = (tiny_base.path, tiny_base.name) if trainable else None

    def factory(s, observer):
        return DedicatedHost(s, models, engine_factory=FakeEngine, observer=observer, trainable_base=base)

    return TestClient(create_app(settings.model_copy(update={"mode": "dedicated"}), host_factory=factory), base_url=LOCAL)


def test_in_dedicated_mode_jobs_fine_tune_every_weight_of_the_base_and_lora_is_refused(settings, tiny_base, tmp_path):
    with dedicated_client(settings, tiny_base, tmp_path, trainable=True) as client:
        file_id = upload(client, GOOD).json()["id"]
        refused = client.post("/v1/fine_tuning/jobs", json={"model": tiny_base.name, "training_file": file_id, "lora": {"rank": 4}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora"
        unknown = client.post("/v1/fine_tuning/jobs", json={"model": "task-a", "training_file": file_id})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"  # only the base is trained
        assert client.app.state.fine_tuning.full and client.app.state.fine_tuning.base_name == tiny_base.name


def test_a_dedicated_server_with_no_base_to_train_from_says_fine_tuning_is_unavailable(settings, tiny_base, tmp_path):
    with dedicated_client(settings, tiny_base, tmp_path, trainable=False) as client:
        refused = upload(client, GOOD)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "fine_tuning_unavailable"


def test_a_key_that_may_not_use_the_base_may_not_fine_tune_it(settings, registry, tiny_base, tmp_path):
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.tenants.keys import KeyLimits, add
    from tests.fakes import FakeEngine
    from tests.unit.conftest import LOCAL

    keys_file = tmp_path / "keys.yaml"
    _, no_base = add(keys_file, "team-b", ["alpha"], False, ["inference"], KeyLimits())
    app = create_app(settings.model_copy(update={"keys_file": keys_file}), host_factory=lambda s, observer: SharedBaseHost(
        s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    with TestClient(app, base_url=LOCAL) as client:
        headers = {"authorization": f"Bearer {no_base}"}
        file = client.post("/v1/files", headers=headers, files={"file": ("t.jsonl", GOOD.encode())}, data={"purpose": "fine-tune"}).json()
        refused = client.post("/v1/fine_tuning/jobs", headers=headers, json={"model": tiny_base.name, "training_file": file["id"]})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"] == []


def test_where_only_signed_adapters_serve_jobs_need_a_trusted_signing_key(make_client, tiny_base, tmp_path):
    """A job's adapter must be servable when it is done: a server that requires signatures
    refuses the job at once (not after its training) without a fine_tuning_signing_key, or
    with one whose public key it does not trust; with a trusted one it takes jobs."""
    from tests.adapter_factory import signing_key_pair

    trainer, other = signing_key_pair(tmp_path, "trainer"), signing_key_pair(tmp_path, "other")
    signed = {"require_signed_adapters": True, "trusted_adapter_keys": [trainer[1]]}
    for key, says in ((None, "no fine_tuning_signing_key"), (other[0], "not one of trusted_adapter_keys")):
        client = make_client(**signed, fine_tuning_signing_key=key)
        file_id = upload(client, GOOD).json()["id"]
        refused = client.post("/v1/fine_tuning/jobs", json={"model": tiny_base.name, "training_file": file_id})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "signing_key_required", refused.text
        assert says in refused.json()["error"]["message"]
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert make_client(**signed, fine_tuning_signing_key=trainer[0]).app.state.fine_tuning.unsignable is None
    assert make_client(fine_tuning_signing_key=None).app.state.fine_tuning.unsignable is None  # signatures not required
