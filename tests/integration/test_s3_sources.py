"""A real server whose adapters come from a real S3-compatible server (moto, started by the
tests) and a local store, with signatures required: through the official openai client, a
demo adapter uploaded to S3 answers exactly as its local copy; unsigned, tampered and
foreign-signed adapters are refused with the reason (never a fallback to the base); one
uploaded while the server runs answers its first request; one deleted is unregistered by
the scan. The server reads S3 through the standard AWS environment only."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from adapterserve.registry.signing import sign_folder
from adapterserve.server_process import ServerProcess
from tests.adapter_factory import signing_key_pair
from tests.integration.conftest import ADMIN_KEY, S3_BUCKET
from tests.s3_server import delete_prefix, upload_folder

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PREFIX = "signed"
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, demo_dir):
    """Copies of the demo adapters, signed (or not) as each test case needs."""
    root = tmp_path_factory.mktemp("s3-adapters")
    trusted, _ = keys = signing_key_pair(root, "trusted")
    other, _ = signing_key_pair(root, "other")

    def copy(demo: str, name: str, key=None):
        folder = shutil.copytree(demo_dir / demo, root / "made" / name)
        if key is not None:
            sign_folder(folder, key)
        return folder

    made = {
        "local-pirate": copy("pirate", "local-pirate", trusted),
        "s3-pirate": copy("pirate", "s3-pirate", trusted),
        "s3-unsigned": copy("json", "s3-unsigned"),
        "s3-other-key": copy("json", "s3-other-key", other),
        "s3-late": copy("french", "s3-late", trusted),
    }
    tampered = copy("pirate", "s3-tampered", trusted)
    shutil.copyfile(demo_dir / "french" / "adapter_model.safetensors", tampered / "adapter_model.safetensors")
    made["s3-tampered"] = tampered
    return {"root": root, "public_key": keys[1], **made}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, s3, folders):
    client = s3.client()
    for name in ("s3-pirate", "s3-unsigned", "s3-other-key", "s3-tampered"):
        upload_folder(client, S3_BUCKET, f"{PREFIX}/{name}", folders[name])
    local = folders["root"] / "local-store"
    shutil.copytree(folders["local-pirate"], local / "local-pirate")
    logs = tmp_path_factory.mktemp("s3-server")
    process = ServerProcess(
        [
            "--no-demo-adapters", "--adapter-dirs", str(local), "--adapter-sources", f"s3://{S3_BUCKET}/{PREFIX}",
            "--require-signed-adapters", "--trusted-adapter-keys", str(folders["public_key"]),
            "--admin-api-key", ADMIN_KEY, "--adapter-scan-interval-s", "0",
        ],
        logs / "server.log", env=s3.env,
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def s3_client(s3_server):
    return openai.OpenAI(base_url=f"{s3_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    assert answer.model == model
    return answer.choices[0].message.content


def test_an_adapter_from_s3_answers_exactly_as_its_local_copy(s3_client, base_name):
    from_s3 = chat(s3_client, "s3-pirate")
    assert from_s3 == chat(s3_client, "local-pirate")
    assert from_s3 != chat(s3_client, base_name)  # the adapter is applied, not the base


def test_unsigned_tampered_and_foreign_signed_adapters_are_refused_with_the_reason(s3_server, s3_client):
    problems = {p["name"]: p for p in httpx.get(f"{s3_server.url}/admin/adapters", headers=ADMIN, timeout=30).json()["refused"]}
    assert "not signed (no model.sig)" in problems["s3-unsigned"]["reason"]
    assert "do not match what was signed" in problems["s3-tampered"]["reason"]
    assert "not signed by a trusted key" in problems["s3-other-key"]["reason"]
    assert problems["s3-tampered"]["path"] == f"s3://{S3_BUCKET}/{PREFIX}/s3-tampered"
    listed = {m.id for m in s3_client.models.list().data}
    assert {"s3-pirate", "local-pirate"} <= listed and not listed & set(problems)
    for name in problems:
        with pytest.raises(openai.NotFoundError) as refused:
            chat(s3_client, name)
        assert refused.value.body["code"] == "model_not_found"


def test_an_adapter_uploaded_while_serving_answers_its_first_request_and_a_deleted_one_is_unregistered(
    s3, s3_server, s3_client, folders,
):
    client = s3.client()
    upload_folder(client, S3_BUCKET, f"{PREFIX}/s3-late", folders["s3-late"])
    late = chat(s3_client, "s3-late")  # discovered on its first request: fetched, verified, validated
    assert late and late != chat(s3_client, "s3-pirate")
    assert "s3-late" in {m.id for m in s3_client.models.list().data}

    delete_prefix(client, S3_BUCKET, f"{PREFIX}/s3-late")
    scan = httpx.post(f"{s3_server.url}/admin/adapters/scan", headers=ADMIN, timeout=60)
    assert scan.status_code == 200 and "s3-late" in scan.json()["removed"]
    assert "s3-late" not in {m.id for m in s3_client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(s3_client, "s3-late")
