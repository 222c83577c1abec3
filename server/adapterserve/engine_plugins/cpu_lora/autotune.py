"""The CPU LoRA path's forms chosen by measurement on the CPU at hand, once per CPU.

Which form applies a step's LoRA layers fastest (token by token through the kernel of
`lora_kernel.cpp`, the dense matmuls over the slots in use, or the tokens grouped by
adapter: `punica.FORMS`) depends on the CPU: the hand rules in `punica.py` were measured
on CPUs without AMX, and where oneDNN's AMX makes the model's bf16 matmuls ~5x faster the
balance moves (the dense and grouped forms' matmuls are oneDNN's, so they use AMX where
the CPU has it; the kernel uses AVX512-BF16 or AVX2). So at the first LoRA step of an
engine, this module times every form on the engine's own layer shapes (those `lay_out`
laid out: in features, slices, rank, dtype, slots), at the batch sizes of a decode step
and of prefill chunks over 1 to 16 adapters, and the step's plan takes the fastest form
measured at the nearest size (`Tuning.form`). How each form is timed, and how a time
disturbed by a busy machine is found and measured again: `measurement.py`.

The measurement takes a few seconds and runs while the engine starts (its first forward
pass is vLLM's warm-up, the machine otherwise quiet); its result is kept in the kernel
directory per CPU identity, torch version, kernel build, threads and layer shapes (like
`dtypes.measured_cpu_dtype`), so later starts read it (not one left implausible: the next
start measures again). Off (`ADAPTERSERVE_LORA_AUTOTUNE=0`),
or where the measurement fails, the hand rules serve. The decision and its timings are
logged and reported by the worker (`/admin/engines`: `lora_forms`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")

ENV_SWITCH = "ADAPTERSERVE_LORA_AUTOTUNE"
VERSION = 2  # of what is measured and how: a new version measures again
# An engine waits this long for another process's measurement (a few seconds each).
LOCK_WAIT_S = 60.0


@dataclass(frozen=True)
class Shape:
    """One LoRA linear layer's geometry as laid out (`layout.lay_out`)."""

    in_features: int
    slices: tuple[int, ...]  # output features per slice
    rank: int  # the slots' (maximum) rank
    slots: int
    dtype: str


@dataclass
class Tuning:
    """Milliseconds per form at each measured size, and the fastest form per step."""

    timings: dict[tuple[int, int], dict[str, float]]  # (tokens, adapters) -> form -> ms
    source: str  # "measured" (this start) or "cached"
    seconds: float = 0.0  # how long the measurement took
    shapes: tuple[Shape, ...] = ()
    implausible: tuple[str, ...] = ()  # sizes whose times stayed contradictory: not kept

    def form(self, tokens: int, adapters: int, kernel: bool = True) -> str:
        """The fastest form measured at the size nearest `tokens` x `adapters` (the kernel
        only where it may apply the step). Called once per step: a few microseconds."""
        token_size = _nearest(tokens, self._sizes)
        adapter_size = _nearest(adapters, self._sizes[token_size])
        measured = {f: ms for f, ms in self.timings[(token_size, adapter_size)].items() if kernel or f != "kernel"}
        return min(measured, key=measured.get) if measured else "dense"

    @functools.cached_property
    def _sizes(self) -> dict[int, list[int]]:
        """The measured adapter counts per measured token count."""
        sizes: dict[int, list[int]] = {}
        for tokens, adapters in sorted(self.timings):
            sizes.setdefault(tokens, []).append(adapters)
        return sizes

    def choices(self) -> dict[str, str]:
        """The form chosen at each measured size, as 'tokens x adapters' -> form."""
        return {f"{t}x{a}": min(ms, key=ms.get) for (t, a), ms in sorted(self.timings.items())}

    def as_report(self) -> dict:
        return {
            "source": self.source, "seconds": round(self.seconds, 2), "choices": self.choices(),
            **({"implausible": list(self.implausible)} if self.implausible else {}),
            "ms": {f"{t}x{a}": ms for (t, a), ms in sorted(self.timings.items())},
            "shapes": [dataclasses.asdict(s) for s in self.shapes],
        }


def _nearest(value: int, sizes) -> int:
    return min(sizes, key=lambda size: (abs(math.log2(max(value, 1)) - math.log2(size)), -size))


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class _Decisions:
    """This process's layer shapes (noted as layers are laid out) and its tunings by dtype."""

    def __init__(self) -> None:
        self.shapes: dict[Shape, None] = {}  # in the order first seen
        self.tunings: dict[torch.dtype, Tuning | None] = {}
        self.fallback_reason: str | None = None


_decisions = _Decisions()


def note_layer(layer) -> None:
    """A step after `layout.lay_out`: remember the layer's shape for the measurement."""
    a_slices, b_slices = layer.lora_a_stacked, layer.lora_b_stacked
    slots, _, rank, in_features = a_slices[0].shape
    note_shape(Shape(int(in_features), tuple(int(b.shape[2]) for b in b_slices), int(rank), int(slots),
                     str(a_slices[0].dtype).removeprefix("torch.")))


def note_shape(shape: Shape) -> None:
    """Remember a layer shape for the measurement (as `note_layer`, for a bench's layers)."""
    _decisions.shapes.setdefault(shape, None)


def tuning_for(dtype: torch.dtype, kernel) -> Tuning | None:
    """The tuning for layers in `dtype` in this process: measured (or read from the cache)
    the first time; None (the hand rules) where it is off, no layer of `dtype` was laid
    out, or the measurement failed (logged once)."""
    if dtype in _decisions.tunings:
        return _decisions.tunings[dtype]
    tuning = None
    shapes = tuple(s for s in _decisions.shapes if s.dtype == str(dtype).removeprefix("torch."))
    if not enabled_by_env():
        _decisions.fallback_reason = f"off ({ENV_SWITCH}=0)"
    elif not shapes:
        _decisions.fallback_reason = "no laid-out layer of this dtype to measure"
    else:
        try:
            tuning = cached_tuning(shapes, kernel)
            _decisions.fallback_reason = None
        except Exception as error:  # any failure: the hand rules serve
            _decisions.fallback_reason = f"measurement failed: {error!r}"[:500]
    if tuning is None:
        log.warning("CPU LoRA forms: the hand rules serve (%s)", _decisions.fallback_reason)
    else:
        how = "measured" if tuning.source == "measured" else "as kept, measured"
        log.info("CPU LoRA forms (%s in %.1f s, pid %d): %s; ms per form: %s", how, tuning.seconds,
                 os.getpid(), tuning.choices(), tuning.as_report()["ms"])
    _decisions.tunings[dtype] = tuning
    return tuning


def report() -> dict | None:
    """What the worker reports of its decision (`worker_report.memory_report`)."""
    if not _decisions.tunings:
        return None
    tunings = {str(d).removeprefix("torch."): t.as_report() for d, t in _decisions.tunings.items() if t is not None}
    return tunings or {"hand_rules": _decisions.fallback_reason}


def cache_key(shapes: tuple[Shape, ...], kernel) -> str:
    from adapterserve.dtypes import cpu_identity

    library = getattr(kernel, "name", None) or ("none" if kernel is None else "kernel")
    threads = getattr(kernel, "threads", 0)
    return json.dumps({
        "version": VERSION, "cpu": cpu_identity(), "torch": torch.__version__, "kernel": library,
        "kernel_threads": threads, "torch_threads": torch.get_num_threads(),
        "shapes": [dataclasses.asdict(s) for s in shapes],
    }, sort_keys=True)


def cached_tuning(shapes: tuple[Shape, ...], kernel) -> Tuning:
    """Read from the kernel directory if this CPU measured these shapes already; else
    measured and kept there (written under a temporary name and renamed). One process
    measures at a time (a lock beside the files): engines starting together would
    otherwise measure on cores the other is measuring on, and the later one reads what
    the first kept."""
    from .native import kernel_dir, owned_directory

    key = cache_key(shapes, kernel)
    root = owned_directory(kernel_dir())
    path = root / f"lora-forms-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    with open(root / "lora-forms.lock", "a") as lock:
        _lock(lock)
        kept = _read_kept(path, shapes)
        if kept is not None:
            return kept
        tuning = measure(shapes, kernel)
        if tuning.implausible:
            log.warning("CPU LoRA forms: times at %s stayed implausible (the cores were busy): "
                        "serving this measurement, not keeping it", ", ".join(tuning.implausible))
            return tuning
        data = {"key": json.loads(key), "seconds": tuning.seconds,
                "timings": [[t, a, ms] for (t, a), ms in tuning.timings.items()]}
        with tempfile.NamedTemporaryFile("w", dir=root, delete=False, suffix=".tmp") as handle:
            json.dump(data, handle)
        os.replace(handle.name, path)
    return tuning


def _lock(handle) -> None:
    """The measurement lock, waited for at most `LOCK_WAIT_S` (then measured anyway: a
    process stuck holding it must not keep an engine from starting)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("CPU LoRA forms: another process holds the measurement lock; measuring beside it")
                return
            time.sleep(0.1)


def _read_kept(path: Path, shapes: tuple[Shape, ...]) -> Tuning | None:
    try:
        return _parsed(json.loads(path.read_text()), shapes, "cached")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("CPU LoRA forms: %s is unreadable (%s), measuring again", path, error)
        return None


def _parsed(data: dict, shapes: tuple[Shape, ...], source: str) -> Tuning:
    """A kept measurement, its values checked (a file may be damaged)."""
    timings: dict[tuple[int, int], dict[str, float]] = {}
    from .punica import FORMS

    for tokens, adapters, ms in data["timings"]:
        if not (isinstance(tokens, int) and isinstance(adapters, int) and tokens > 0 and adapters > 0):
            raise ValueError(f"size {tokens} x {adapters}")
        if not ms or not all(f in FORMS and isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for f, v in ms.items()):
            raise ValueError(f"timings {ms}")
        timings[(tokens, adapters)] = {f: float(v) for f, v in ms.items()}
    if not timings:
        raise ValueError("no timings")
    return Tuning(timings, source, float(data.get("seconds", 0.0)), shapes)


def measure(shapes: tuple[Shape, ...], kernel) -> Tuning:
    """Every form timed on `shapes` at each size (`measurement.measure_timings`)."""
    from .measurement import measure_timings

    began = time.perf_counter()
    timings, implausible = measure_timings(shapes, kernel)
    return Tuning(timings, "measured", time.perf_counter() - began, shapes, implausible)
