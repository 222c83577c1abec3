"""Requests whose logits hold NaN end with an error, and their adapter is quarantined.

An adapter can pass validation (finite values, sane scaling) and still drive its own
requests' activations to overflow. The engine then samples from NaN logits: greedy picks
an arbitrary token and the answer is garbage or empty, with status 200. vLLM 0.32 can
count NaN logits per request (`VLLM_COMPUTE_NANS_IN_LOGITS`, counted in the worker and
carried to the API process on each output); it offers no hook to act on them. This module
is that hook: it wraps the engine client's output processor so that an output with NaN
logits never reaches its request; the request gets `NonFiniteLogits` instead (vLLM's
generate() aborts it in the engine and the serving layer answers with an error), and the
host is told which adapter it was, to quarantine it.

Other requests of the batch are untouched: each row of the logits is one request's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

ENV_COUNT_NANS = "VLLM_COMPUTE_NANS_IN_LOGITS"  # read by the engine's worker processes


class NonFiniteLogits(RuntimeError):
    """A request's logits held NaN: its output is meaningless."""

    def __init__(self, adapter: str | None):
        what = f"the adapter `{adapter}`" if adapter else "the model"
        super().__init__(f"{what} produced non-finite values (NaN logits); the request was stopped")
        self.adapter = adapter


def watch_nonfinite(client, on_nonfinite: Callable[[str | None, str], None]) -> None:
    """Intercept outputs with NaN logits in `client` (an AsyncLLM); call
    `on_nonfinite(adapter name or None, request id)` for each."""
    processor = getattr(client, "output_processor", None)
    if processor is None or getattr(processor, "_adapterserve_nonfinite", False):
        return
    original = processor.process_outputs

    def process_outputs(engine_core_outputs, *args, **kwargs):
        poisoned = [o for o in engine_core_outputs if getattr(o, "num_nans_in_logits", 0) > 0]
        if poisoned:
            for output in poisoned:
                state = processor.request_states.get(output.request_id)
                if state is None or state.queue is None:
                    continue
                adapter = state.lora_name
                state.queue.put(NonFiniteLogits(adapter))  # generate() raises it and aborts the request
                log.error("request %s: NaN logits from %s", output.request_id, adapter or "the base model")
                try:
                    on_nonfinite(adapter, output.request_id)
                except Exception:  # the report must never break the output loop
                    log.exception("reporting non-finite logits failed")
            engine_core_outputs = [o for o in engine_core_outputs if o not in poisoned]
        return original(engine_core_outputs, *args, **kwargs)

    processor.process_outputs = process_outputs
    processor._adapterserve_nonfinite = True
