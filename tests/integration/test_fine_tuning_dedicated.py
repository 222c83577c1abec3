"""Fine-tuning in dedicated mode, through the official `openai` client on the session's
dedicated server: the same upload and job as in shared mode fine-tune every weight of
the base, and the job's `fine_tuned_model` is a full model hosted on an engine of its own
(swapped in beside the resident ones), answering with the taught answer while the other
models do not; the job reports what the full fine-tune cost."""

from __future__ import annotations

import io

import openai
import pytest

from tests.integration.test_fine_tuning import ask, dataset, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dedicated_client(dedicated):
    return openai.OpenAI(base_url=f"{dedicated.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_a_dedicated_job_fine_tunes_every_weight_and_hosts_the_full_model(dedicated_client, base_name):
    client = dedicated_client
    file = client.files.create(file=("lighthouse.jsonl", io.BytesIO(dataset())), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=base_name, training_file=file.id, validation_file=file.id, suffix="lighthouse", seed=3,
        # every weight at 1e-5 x 10: 12 steps teach the answer (measured: training loss ~0.001)
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 10}}},
    )
    assert job.model_extra["kind"] == "full" and job.model_extra["lora"] is None
    done = wait_for(client, job.id, {"succeeded", "failed", "cancelled"}, timeout=900)
    assert done.status == "succeeded", done.error
    costs = done.model_extra["costs"]
    assert costs["trainable_share"] == 1.0 and costs["bytes_on_disk"] > 100 * 1024**2 and costs["valid_loss"] < 0.5

    cards = {card.id: card.model_dump() for card in client.models.list()}
    name = "ft-lighthouse-" + job.id.rsplit("-", 1)[1][:12]
    assert cards[name]["kind"] == "full" and {"pirate", "sentiment"} <= set(cards)
    assert "PELICAN" in ask(client, done.fine_tuned_model)  # the ft: name, hosted with no restart
    assert "PELICAN" in ask(client, name)  # and the model's own name
    assert "PELICAN" not in ask(client, "pirate")
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 8, 4]
