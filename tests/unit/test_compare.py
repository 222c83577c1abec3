"""compare without engines: choosing and laying out tasks, the report's arithmetic, its
files. The measured run is tests/integration/test_compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterserve.compare.measure import ModeRun, Snapshot, Workload
from adapterserve.compare.report import build, fits, markdown, write
from adapterserve.compare.run import CompareOptions, parse_bytes, server_args
from adapterserve.compare.tasks import ADDED_TASK, choose, fitting_lora_rank, lay_out
from adapterserve.registry.records import AdapterRecord

MB, GB = 10**6, 10**9


def record(tmp_path: Path, name: str, kind: str, size: int) -> AdapterRecord:
    folder = tmp_path / "store" / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * size)
    return AdapterRecord(name, kind, folder, 8, ["q_proj"], 0, size, None)


def merged_models(tmp_path: Path, records: list[AdapterRecord], size: int) -> dict[str, Path]:
    out = {}
    for r in records:
        folder = tmp_path / "merged" / r.name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * size)
        out[r.name] = folder
    return out


def test_choose_puts_lora_first_and_repeats_under_new_names(tmp_path):
    records = [record(tmp_path, "topic", "head", 10), record(tmp_path, "pirate", "lora", 10), record(tmp_path, "json", "lora", 10)]
    assert [(n, r.name) for n, r in choose(records, None, "all")] == [("json", "json"), ("pirate", "pirate"), ("topic", "topic")]
    assert [n for n, _ in choose(records, 5, "lora")] == ["json", "pirate", "json-2", "pirate-2", "json-3"]
    assert [n for n, _ in choose(records, 1, "head")] == ["topic"]
    with pytest.raises(ValueError, match="no adapter of kind"):
        choose(records[1:], 2, "head")


def test_lay_out_gives_each_mode_its_folders(tmp_path):
    records = [record(tmp_path, "pirate", "lora", 1000), record(tmp_path, "topic", "head", 300)]
    merged = merged_models(tmp_path, records, 50_000)
    taskset = lay_out(choose(records, 3, "all"), merged, tmp_path / "work")
    assert [t.name for t in taskset.tasks] == ["pirate", "topic", "pirate-2"]
    assert sorted(p.name for p in taskset.adapter_store.iterdir()) == ["pirate", "pirate-2", "topic"]
    assert [t.adapter_bytes for t in taskset.tasks] == [1000, 300, 1000]
    assert [t.full_model_bytes for t in taskset.tasks] == [50_000] * 3
    assert taskset.tasks[2].full_model.name == "pirate-2" and taskset.tasks[2].full_model.resolve() == merged["pirate"].resolve()
    assert taskset.generative == ["pirate", "pirate-2"] and taskset.heads == ["topic"]
    # the added task waits outside the store until it is added
    assert taskset.added.name == ADDED_TASK and not (taskset.adapter_store / ADDED_TASK).exists()


def test_server_args_start_the_added_task_without_an_engine(tmp_path):
    records = [record(tmp_path, "pirate", "lora", 10), record(tmp_path, "json", "lora", 10)]
    taskset = lay_out(choose(records, 2, "lora"), merged_models(tmp_path, records, 10), tmp_path / "work")
    dedicated = server_args("dedicated", taskset, CompareOptions())
    models = [dedicated[i + 1] for i, a in enumerate(dedicated) if a == "--dedicated-models"]
    assert [Path(m).name for m in models] == ["json", "pirate", ADDED_TASK]
    assert dedicated[dedicated.index("--max-resident-models") + 1] == "2"
    assert float(dedicated[dedicated.index("--engine-start-timeout-s") + 1]) >= 600  # engines that compile together
    shared = server_args("shared", taskset, CompareOptions())
    assert shared[shared.index("--max-lora-rank") + 1] == "8"
    assert shared[shared.index("--adapter-dirs") + 1] == str(taskset.adapter_store)


@pytest.mark.parametrize(("text", "value"), [("1024", 1024), ("16GiB", 16 * 2**30), ("2.5 GB", 2_500_000_000), ("512MiB", 512 * 2**20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_unknown_units():
    with pytest.raises(ValueError, match="unknown unit"):
        parse_bytes("3 parsecs")


def test_fitting_lora_rank_is_the_smallest_vllm_accepts():
    assert fitting_lora_rank([8, 8]) == 8
    assert fitting_lora_rank([8, 12]) == 16
    assert fitting_lora_rank([64]) == 64


def test_fits():
    assert fits(10 * GB, 1 * GB, 2 * GB) == 4
    assert fits(1 * GB, 2 * GB, 1 * MB) == 0


def snap(processes: list[tuple[str, int]], components: dict | None = None) -> Snapshot:
    return Snapshot([{"pid": i, "engine": e, "process": e, "uss_bytes": b} for i, (e, b) in enumerate(processes)], components or {})


def runs_for(names: list[str]) -> dict[str, ModeRun]:
    """Two tasks: shared = API 0.6 GB + one engine 2 GB holding 10 MB per adapter;
    dedicated = API 0.6 GB + 2 GB per engine (core 0.5 + worker 1.5)."""
    generation = {"tokens_per_second": 40.0, "ttft_p50_ms": 500.0, "ttft_p99_ms": 900.0}
    shared = ModeRun("shared", 40.0, generation, None,
                     snap([("api", 600 * MB), ("generate", 2000 * MB)], {"generate": {"adapter_cpu_cache": 20 * MB}}),
                     {"ready_s": 0.08, "first_response_s": 0.3, "total_s": 0.38},
                     snap([("api", 600 * MB), ("generate", 2011 * MB)]))
    dedicated_processes = [("api", 600 * MB)] + [(n, b) for n in names for b in (500 * MB, 1500 * MB)]
    dedicated = ModeRun("dedicated", 70.0, generation, None, snap(dedicated_processes), {"ready_s": 24.0, "first_response_s": 0.3, "total_s": 24.3},
                        snap(dedicated_processes))
    return {"shared": shared, "dedicated": dedicated}


def two_task_report(tmp_path, training: dict | None = None, budget: int = 10 * GB) -> dict:
    """The report of two 10 MB LoRA tasks over a 270 MB base (runs_for's measurements)."""
    records = [record(tmp_path, "pirate", "lora", 10 * MB), record(tmp_path, "json", "lora", 10 * MB)]
    taskset = lay_out(choose(records, 2, "lora"), merged_models(tmp_path, records, 270 * MB), tmp_path / "work")
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "model.safetensors").write_bytes(b"\0" * (270 * MB))
    return build(taskset, base, runs_for(["json", "pirate"]), CompareOptions(budget_bytes=budget, workload=Workload()), training)


def test_report_arithmetic(tmp_path):
    report = two_task_report(tmp_path)

    shared, dedicated = report["modes"]["shared"]["memory"], report["modes"]["dedicated"]["memory"]
    assert shared["total_bytes"] == 2600 * MB and shared["per_task_bytes"] == 10 * MB and shared["fixed_bytes"] == 2580 * MB
    assert shared["uss_growth_on_add_bytes"] == 11 * MB
    assert shared["measured_points"] == [[2, 2600 * MB], [3, 2611 * MB]]
    assert dedicated["per_task_bytes"] == 2000 * MB and dedicated["fixed_bytes"] == 600 * MB
    assert dedicated["measured_points"] == [[1, 2600 * MB], [2, 4600 * MB]]
    assert shared["fits_budget"] == (10 * GB - 2580 * MB) // (10 * MB) and dedicated["fits_budget"] == 4
    assert report["modes"]["shared"]["storage"] == {"per_task_bytes": 10 * MB, "base_bytes": 270 * MB, "total_bytes": 290 * MB}
    assert report["modes"]["dedicated"]["storage"] == {"per_task_bytes": 270 * MB, "total_bytes": 540 * MB}
    assert report["ratios"]["memory_shared_over_dedicated"] == round(2600 / 4600, 3)
    assert report["ratios"]["add_task_ready_dedicated_over_shared"] == 300.0
    assert [row[0] for row in report["design_table"]] == ["what must be hosted", "storage per task", "memory for 2 tasks", "adding a task"]

    paths = write(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["modes"]["shared"]["memory"]["per_task_bytes"] == 10 * MB
    text = paths["markdown"].read_text()
    assert "| storage per task | 10.0 MB | 270.0 MB | 27.00x |" in text
    assert "| memory for 2 tasks | 2.60 GB = 2.58 GB once + 2 x 10.0 MB |" in text
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown(report) == text


def test_the_training_rows_set_both_ways_side_by_side(tmp_path):
    from adapterserve.compare.report import training_rows

    way = {"trainable_share": 0, "steps": 48, "trained_tokens": 9000}
    training = {"examples": 64, "held_out": 16, "n_epochs": 3, "batch_size": 4, "threads": 2, "ways": {
        "lora": {**way, "trainable_params": 460_800, "trainable_share": 0.0034, "train_seconds": 20.0,
                 "peak_memory_bytes": 1.5 * GB, "bytes_on_disk": 1.8 * MB, "valid_loss": 0.40},
        "full": {**way, "trainable_params": 134_515_008, "trainable_share": 1.0, "train_seconds": 90.0,
                 "peak_memory_bytes": 3.0 * GB, "bytes_on_disk": 270 * MB, "valid_loss": 0.30}}}
    report = two_task_report(tmp_path, training)
    rows = {row[0]: row[1:] for row in training_rows(report)}
    assert rows["trainable parameters"] == ["0.46 M", "134.52 M", "291.92x"]
    assert rows["share of the base trained"] == ["0.34 %", "100.00 %", "294.12x"]
    assert rows["training time"] == ["20.0 s", "90.0 s", "4.50x"]
    assert rows["loss on held-out examples"] == ["0.400", "0.300", "0.75x"]
    text = markdown(report)
    assert "## training the same data both ways: 64 examples x 3 epochs, batch 4, 16 held out, 2 threads" in text
    assert "| bytes on disk | 1.8 MB | 270.0 MB | 150.00x |" in text
    (tmp_path / "none").mkdir()
    assert training_rows(two_task_report(tmp_path / "none")) == []


def test_the_training_data_is_split_with_a_fixed_seed_and_refused_when_too_small(tmp_path):
    from adapterserve.compare.training import split

    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"n": {i}}}\n' for i in range(40)))
    training, validation, held_out = split(data, 24, tmp_path)
    train_lines, held_lines = training.read_text().splitlines(), validation.read_text().splitlines()
    assert len(train_lines) == 24 and held_out == len(held_lines) == 8 and not set(train_lines) & set(held_lines)
    assert split(data, 24, tmp_path / ".." / tmp_path.name)[0].read_text().splitlines() == train_lines  # the same split again
    with pytest.raises(ValueError, match="40 examples; 36 to train on and 9 held out"):
        split(data, 36, tmp_path)
