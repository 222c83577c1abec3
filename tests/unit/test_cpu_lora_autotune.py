"""The autotuner of the CPU LoRA path (engine_plugins/cpu_lora/autotune.py): it measures
every form on the layer shapes it is given, on this CPU, chooses the fastest per batch
size, keeps the result per CPU and shapes, and falls back to the hand rules, saying why.
(That every form it can choose computes what vLLM's reference does: test_cpu_lora_fused.py.)"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from adapterserve.engine_plugins.cpu_lora import autotune, measurement, punica
from adapterserve.engine_plugins.cpu_lora.native import load_kernel

# two small layer shapes (q/k/v-like and a single slice), 4 slots, so a measurement is short
SHAPES = (autotune.Shape(64, (64, 32, 32), 8, 4, "float32"), autotune.Shape(96, (64,), 8, 4, "float32"))


@pytest.fixture(autouse=True)
def short(monkeypatch):
    """Two batch sizes and short repeats: the choice logic is the point here, not the figures."""
    monkeypatch.setattr(measurement, "TOKENS", (16, 256))
    monkeypatch.setattr(measurement, "REPEAT_BUDGET_S", 0.005)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process with no decision made yet, its cache in a folder of the test's."""
    monkeypatch.setattr(autotune, "_decisions", autotune._Decisions())
    monkeypatch.setenv("ADAPTERSERVE_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.delenv(autotune.ENV_SWITCH, raising=False)
    return tmp_path / "kernels"


def test_every_form_is_timed_at_each_size_and_the_fastest_is_chosen():
    tuning = autotune.measure(SHAPES, load_kernel())
    sizes = {(t, a) for t in measurement.TOKENS for a in measurement.ADAPTERS if a <= 4}
    assert set(tuning.timings) == sizes
    for (tokens, adapters), ms in tuning.timings.items():
        assert set(ms) == ({"kernel", "dense"} if adapters == 1 else {"kernel", "dense", "grouped"})
        assert all(value > 0 for value in ms.values())
        assert tuning.form(tokens, adapters) == min(ms, key=ms.get)
        without_kernel = {f: v for f, v in ms.items() if f != "kernel"}
        assert tuning.form(tokens, adapters, kernel=False) == min(without_kernel, key=without_kernel.get)
    assert tuning.source == "measured" and "seconds" in tuning.as_report()  # how long: reported, not a target


def test_without_a_kernel_only_the_matmul_forms_are_measured_and_inference_mode_is_no_obstacle():
    with torch.inference_mode():  # as in the engine's warm-up
        tuning = autotune.measure(SHAPES, None)
    assert all("kernel" not in ms for ms in tuning.timings.values())


def test_a_batch_takes_the_nearest_measured_size():
    timings = {(t, a): {"dense": 1.0} for t in (16, 1024) for a in (1, 4)}
    timings[(16, 4)] = {"kernel": 1.0, "grouped": 2.0}
    timings[(1024, 4)] = {"kernel": 2.0, "grouped": 1.0}
    tuning = autotune.Tuning(timings, "measured")
    assert tuning.form(3, 3) == "kernel"  # 3 adapters: nearer 4 than 1 (in log scale)
    assert tuning.form(3, 3, kernel=False) == "grouped"  # the kernel may not apply: the next fastest
    assert tuning.form(700, 5) == "grouped" and tuning.form(100, 5) == "kernel"  # 700 nearer 1024, 100 nearer 16
    assert tuning.form(16, 1) == "dense"


def test_the_plan_follows_the_tuning():
    mapping = torch.tensor([0, 1, 2, -1] * 4)
    for form in punica.FORMS:
        tuning = autotune.Tuning({(16, 4): {form: 1.0}}, "forced")
        plan = punica.make_step_plan(mapping, torch.float32, kernel=True, tuning=tuning)
        assert (plan.slot_of is not None, bool(plan.groups), plan.mask is not None) == (
            form == "kernel", form == "grouped", form == "dense")
        assert plan.form == form
    single = punica.make_step_plan(torch.tensor([2] * 16), torch.float32, kernel=False)
    assert single.form == "single"
    kernel_only = autotune.Tuning({(16, 4): {"kernel": 1.0}}, "forced")
    assert punica.make_step_plan(mapping, torch.float32, kernel=False, tuning=kernel_only).mask is not None


def test_the_measurement_is_kept_per_cpu_and_shapes_and_read_by_later_starts(fresh, monkeypatch):
    first = autotune.cached_tuning(SHAPES, None)
    files = list(fresh.glob("lora-forms-*.json"))
    assert first.source == "measured" and len(files) == 1
    assert json.loads(files[0].read_text())["key"]["shapes"][0]["in_features"] == 64

    monkeypatch.setattr(autotune, "measure", lambda *a: pytest.fail("measured again"))
    again = autotune.cached_tuning(SHAPES, None)
    assert again.source == "cached" and again.timings == first.timings

    monkeypatch.undo()
    monkeypatch.setenv("ADAPTERSERVE_KERNEL_DIR", str(fresh))
    autotune.cached_tuning(SHAPES[:1], None)  # other shapes: measured, kept beside
    assert len(list(fresh.glob("lora-forms-*.json"))) == 2


@pytest.mark.parametrize("damage", ["{not json", '{"timings": [[16, 1, {"dense": -1}]]}',
                                    '{"timings": [[16, 1, {"magic": 1.0}]]}', '{"timings": []}'])
def test_a_damaged_measurement_file_is_measured_again(fresh, damage):
    autotune.cached_tuning(SHAPES, None)
    path = next(fresh.glob("lora-forms-*.json"))
    path.write_text(damage)
    tuning = autotune.cached_tuning(SHAPES, None)
    assert tuning.source == "measured"
    assert json.loads(path.read_text())["timings"]  # and kept again


def laid_out_layer(shape: autotune.Shape):
    dtype = getattr(torch, shape.dtype)
    return SimpleNamespace(
        lora_a_stacked=tuple(torch.zeros(shape.slots, 1, shape.rank, shape.in_features, dtype=dtype) for _ in shape.slices),
        lora_b_stacked=tuple(torch.zeros(shape.slots, 1, out, shape.rank, dtype=dtype) for out in shape.slices),
    )


def test_the_engines_layers_are_measured_once_and_reported(fresh, caplog):
    for shape in SHAPES:
        autotune.note_layer(laid_out_layer(shape))
        autotune.note_layer(laid_out_layer(shape))  # a layer of the same shape: measured once
    assert list(autotune._decisions.shapes) == list(SHAPES)
    assert autotune.report() is None  # nothing decided before the first LoRA step
    with caplog.at_level("INFO", logger=autotune.log.name):
        tuning = autotune.tuning_for(torch.float32, None)
    assert tuning is not None and tuning.shapes == SHAPES
    assert autotune.tuning_for(torch.float32, None) is tuning
    assert "CPU LoRA forms (measured in" in caplog.text
    report = autotune.report()["float32"]
    assert report["source"] == "measured" and set(report["choices"].values()) <= {"dense", "grouped"}
    assert report["choices"]["16x1"] == min(report["ms"]["16x1"], key=report["ms"]["16x1"].get)


def test_the_hand_rules_serve_when_off_or_when_the_measurement_fails(fresh, monkeypatch, caplog):
    autotune.note_layer(laid_out_layer(SHAPES[0]))
    monkeypatch.setenv(autotune.ENV_SWITCH, "0")
    assert autotune.tuning_for(torch.float32, None) is None
    assert autotune.report() == {"hand_rules": "off (ADAPTERSERVE_LORA_AUTOTUNE=0)"}

    monkeypatch.setattr(autotune, "_decisions", autotune._Decisions())
    monkeypatch.delenv(autotune.ENV_SWITCH)
    autotune.note_layer(laid_out_layer(SHAPES[0]))

    def broken(*args):
        raise RuntimeError("no luck")

    monkeypatch.setattr(autotune, "measure", broken)
    with caplog.at_level("WARNING", logger=autotune.log.name):
        assert autotune.tuning_for(torch.float32, None) is None
    assert "hand rules serve (measurement failed: RuntimeError('no luck'))" in caplog.text
    assert autotune.tuning_for(torch.bfloat16, None) is None  # no bf16 layer laid out
    assert "no laid-out layer" in autotune.report()["hand_rules"]


def test_one_process_measures_at_a_time_and_a_stuck_lock_only_delays(fresh, monkeypatch):
    """Engines starting together: the second waits for the first's measurement and reads it;
    a lock held for longer than the wait is measured beside."""
    import fcntl
    import threading

    autotune.cached_tuning(SHAPES[:1], None)  # makes the folder and the lock file
    lock = open(fresh / "lora-forms.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    measured_at = []
    real = autotune.measure
    monkeypatch.setattr(autotune, "measure", lambda *a: measured_at.append(time.monotonic()) or real(*a))
    released_at = []

    def release():
        time.sleep(0.5)
        released_at.append(time.monotonic())
        fcntl.flock(lock, fcntl.LOCK_UN)

    threading.Thread(target=release).start()
    autotune.cached_tuning(SHAPES, None)
    assert measured_at[0] >= released_at[0]

    fcntl.flock(lock, fcntl.LOCK_EX)
    monkeypatch.setattr(autotune, "LOCK_WAIT_S", 0.3)
    began = time.monotonic()
    assert autotune.cached_tuning(SHAPES[1:], None).source == "measured"  # not kept yet: measured beside the lock
    assert time.monotonic() - began >= 0.3
    lock.close()


def test_the_setting_reaches_the_engines_processes():
    from adapterserve.config import Settings
    from adapterserve.hosting.engine_environment import engine_environment

    assert engine_environment(Settings(), "generate")[autotune.ENV_SWITCH] == "1"
    assert engine_environment(Settings(cpu_lora_autotune=False), "pooling")[autotune.ENV_SWITCH] == "0"


def test_a_size_slower_than_a_larger_one_is_implausible():
    # the cached measurement that served a one-adapter decode step in the dense form (its
    # kernel time taken while another engine started beside it)
    timings = {(16, 1): {"kernel": 29.8862, "dense": 1.7517}, (16, 2): {"kernel": 0.0975, "dense": 1.0864},
               (64, 1): {"kernel": 0.1, "dense": 0.5579}, (64, 2): {"kernel": 0.1087, "dense": 0.8168}}
    assert measurement.implausible_sizes(timings) == {(16, 1)}
    timings[(16, 1)]["kernel"] = 0.0385  # as measured on a quiet machine
    assert measurement.implausible_sizes(timings) == set()
    timings[(64, 2)]["dense"] = 0.6  # slower at the smaller sizes, but losing there either way: no matter
    assert measurement.implausible_sizes(timings) == set()
    timings[(64, 2)]["dense"] = 0.01  # now it might have won at each smaller size
    assert measurement.implausible_sizes(timings) == {(16, 1), (16, 2), (64, 1)}


def test_an_implausible_size_is_measured_again_and_a_measurement_left_implausible_is_not_kept(fresh, monkeypatch):
    calls = []
    real_time = measurement._time_ms

    def disturbed(plan, *args):  # the kernel at the smallest size: slow the first two times
        kernel_at_smallest = plan.slot_of is not None and plan.tokens == measurement.TOKENS[0] and len(plan.present) == 1
        if kernel_at_smallest and calls.count("slow") < 2:
            calls.append("slow")
            return 1000.0
        return real_time(plan, *args)

    monkeypatch.setattr(measurement, "_time_ms", disturbed)
    tuning = autotune.measure(SHAPES, load_kernel())
    assert calls.count("slow") == 2 and tuning.implausible == ()  # measured again until believable
    assert tuning.timings[(measurement.TOKENS[0], 1)]["kernel"] < 1000.0

    monkeypatch.setattr(measurement, "RETRIES", 0)
    calls.clear()
    tuning = autotune.cached_tuning(SHAPES, load_kernel())
    assert tuning.implausible == (f"{measurement.TOKENS[0]}x1",) and tuning.as_report()["implausible"]
    assert tuning.form(measurement.TOKENS[0], 1) == "kernel"  # this start: at most its time at a larger size
    assert not list(fresh.glob("lora-forms-*.json"))  # not kept: the next start measures again
