"""The jobs' trainer (finetuning/trainer.py) on the real base, without a server: a run
stopped after its first epoch and resumed from that checkpoint ends with the same weights
as a run never stopped (the optimizer's state, the schedule, the step and the random
state are in the checkpoint; the seeded batches are skipped, not redrawn)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.integration.test_fine_tuning import dataset

pytestmark = pytest.mark.integration


def train(base_path, folder, training, epochs, resume_from=None, stop_at_checkpoint=False):
    spec = {"kind": "lora", "base_path": str(base_path), "training_file": str(training), "validation_file": None,
            "out_dir": str(folder / "out"), "checkpoints_dir": str(folder / "checkpoints"), "threads": 1,
            "n_epochs": epochs, "batch_size": 4, "learning_rate": 2e-3, "seed": 5, "rank": 4, "alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "labels": [], "priority": "normal",
            "resume_from": str(resume_from) if resume_from else None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    process = subprocess.Popen([sys.executable, "-m", "adapterserve.finetuning.trainer", str(folder / "spec.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    messages = []
    for line in process.stdout:
        if line.startswith("{"):
            messages.append(json.loads(line))
            if stop_at_checkpoint and messages[-1]["type"] == "checkpoint":
                process.kill()  # as a server stopping would
                break
    assert process.wait(timeout=600) == (-9 if stop_at_checkpoint else 0), messages[-3:]
    return messages


def test_a_run_resumed_from_its_checkpoint_ends_with_the_weights_of_a_run_never_stopped(base_path, tmp_path):
    training = tmp_path / "train.jsonl"
    training.write_bytes(dataset(12))  # 3 steps an epoch
    whole = train(base_path, tmp_path / "whole", training, epochs=2)
    first = train(base_path, tmp_path / "stopped", training, epochs=2, stop_at_checkpoint=True)  # killed after step 3...
    checkpoint = tmp_path / "stopped" / "checkpoints" / "step-3"
    assert first[-1]["type"] == "checkpoint" and (checkpoint / "trainer_state.pt").is_file()
    resumed = train(base_path, tmp_path / "resumed", training, epochs=2, resume_from=checkpoint)  # ...and resumed
    assert resumed[0] == {"type": "resumed", "step": 3, "total_steps": 6, "trained_tokens": first[2]["trained_tokens"]}
    assert [m["step"] for m in resumed if m["type"] == "step"] == [4, 5, 6]
    assert resumed[-1]["trained_tokens"] == whole[-1]["trained_tokens"]
    expected = load_file(tmp_path / "whole" / "out" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "out" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert (expected[name] == got[name]).all(), name  # exact: the same arithmetic in the same order
