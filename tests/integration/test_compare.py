"""`adapterserve compare` for real: two LoRA tasks, a short workload, both modes' servers
one after the other; the report's structure and the invariants of the two ways of hosting."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from adapterserve.metrics.memory import folder_bytes
from adapterserve.training.merge import merged_store
from adapterserve.config import load_settings

pytestmark = pytest.mark.integration

TASKS = ["french", "json"]  # --tasks 2 --kind lora: the LoRA demos by name
REQUESTS, MAX_TOKENS = 4, 8
TRAIN_EXAMPLES = 8  # the training rows: 8 pirate examples x 3 epochs, both ways (~1 min)


@pytest.fixture(scope="module")
def report(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("compare")
    command = [
        sys.executable, "-m", "adapterserve", "compare", "--tasks", "2", "--kind", "lora", "--requests", str(REQUESTS),
        "--concurrency", "2", "--max-tokens", str(MAX_TOKENS), "--budget", "16GiB", "--out", str(out),
        "--train-examples", str(TRAIN_EXAMPLES),
    ]
    process = subprocess.Popen(command, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # compare stops its servers on the way out
        output, _ = process.communicate(timeout=120)
        pytest.fail(f"compare did not finish in 20 minutes:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    return json.loads((out / "compare.json").read_text()), out, output


def test_report_has_both_modes_and_the_files(report):
    data, out, output = report
    assert [t["name"] for t in data["tasks"]] == TASKS
    assert set(data["modes"]) == {"shared", "dedicated"}
    assert data["options"]["budget_bytes"] == 16 * 2**30
    for mode in data["modes"].values():
        assert mode["start_to_ready_s"] > 0
        assert mode["generation"]["output_tokens"] == REQUESTS * MAX_TOKENS  # ignore_eos: every token was produced
        assert mode["add_task"]["ready_s"] > 0 and mode["add_task"]["total_s"] >= mode["add_task"]["ready_s"]
    assert [row[0] for row in data["design_table"]] == ["what must be hosted", "storage per task", "memory for 2 tasks", "adding a task"]
    markdown = (out / "compare.md").read_text()
    assert "| storage per task |" in markdown and "| memory for 2 tasks |" in markdown
    assert (out / "compare-memory.png").read_bytes()[:4] == b"\x89PNG"
    assert "the hosting table, measured" in output


def test_storage_per_task_is_the_adapter_in_shared_mode_and_the_model_in_dedicated(report, demo_dir, base_path):
    data, _, _ = report
    adapters = [folder_bytes(demo_dir / name) for name in TASKS]
    models = [folder_bytes(merged_store(load_settings().cache_dir, base_path) / name) for name in TASKS]
    assert [t["adapter_bytes"] for t in data["tasks"]] == adapters
    assert [t["full_model_bytes"] for t in data["tasks"]] == models
    assert data["modes"]["shared"]["storage"]["per_task_bytes"] == sum(adapters) // 2
    assert data["modes"]["dedicated"]["storage"]["per_task_bytes"] == sum(models) // 2
    assert data["modes"]["shared"]["storage"]["total_bytes"] == folder_bytes(base_path) + sum(adapters)


def test_dedicated_memory_grows_by_an_engine_per_task_and_shared_by_far_less(report):
    data, _, _ = report
    shared, dedicated = data["modes"]["shared"]["memory"], data["modes"]["dedicated"]["memory"]
    snapshot = dedicated["snapshot"]
    # one engine per task, each with processes of its own holding at least its model's weights
    assert set(dedicated["engines"]) == set(TASKS)
    for name in TASKS:
        assert dedicated["engines"][name] >= snapshot["components"][name]["base_weights"] > 0
    points = dedicated["measured_points"]
    assert [p[0] for p in points] == [1, 2]
    assert points[1][1] - points[0][1] >= snapshot["components"][TASKS[1]]["base_weights"]
    # shared: one engine for both tasks; a task adds its adapter, not an engine
    assert set(shared["engines"]) == {"generate"}
    assert 0 < shared["per_task_bytes"] < 0.05 * dedicated["per_task_bytes"]
    assert shared["uss_growth_on_add_bytes"] < 0.1 * dedicated["per_task_bytes"]
    assert shared["total_bytes"] < dedicated["total_bytes"]
    assert shared["fits_budget"] > dedicated["fits_budget"] >= 1


def test_adding_a_task_is_a_load_in_shared_mode_and_an_engine_in_dedicated(report):
    data, _, _ = report
    shared, dedicated = data["modes"]["shared"]["add_task"], data["modes"]["dedicated"]["add_task"]
    assert shared["ready_s"] < dedicated["ready_s"]
    assert dedicated["ready_s"] > 1  # an engine start is seconds, not milliseconds


def test_the_same_data_trained_both_ways_gives_the_training_rows(report, base_path):
    data, out, output = report
    training = data["training"]
    assert training["examples"] == TRAIN_EXAMPLES and training["held_out"] == 8
    lora, full = training["ways"]["lora"], training["ways"]["full"]
    assert 0 < lora["trainable_share"] < 0.01 and full["trainable_share"] == 1.0
    assert full["trainable_params"] > 100 * lora["trainable_params"]
    assert lora["steps"] == full["steps"] == 3 * TRAIN_EXAMPLES // 4
    assert full["bytes_on_disk"] >= folder_bytes(base_path) // 2 > 50 * lora["bytes_on_disk"]  # bf16 weights against an adapter
    assert full["peak_memory_bytes"] > lora["peak_memory_bytes"]  # the optimizer's state for every weight
    # the row reports its time (how fast is bench/'s: bench/RESULTS.md, "Fine-tuning")
    assert all(0 < way["valid_loss"] < 20 and isinstance(way["train_seconds"], float) for way in (lora, full))
    assert "| trainable parameters |" in (out / "compare.md").read_text() and "training the same data both ways" in output
