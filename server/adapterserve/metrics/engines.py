"""What /admin/engines shows of each running engine: its processes, slots and adapter ids,
from the host (through the protocol) and the metrics' last reading of its worker. The
single-machine server and each Ray replica answer with it."""

from __future__ import annotations

from adapterserve.hosting.protocol import Host


def engine_reports(host: Host, metrics) -> list[dict]:
    """Each running engine of the host with its processes, slots and adapter ids."""
    # what each engine's worker reported at the last metrics reading (every metrics_refresh_s)
    readings = {m.name: m for m in metrics.memory if m.measured}

    def described(engine) -> dict:
        reading = readings.get(engine.name)
        return {
            "name": engine.name, "runner": engine.spec.runner, "pids": engine.process_ids(),
            "startup_seconds": engine.startup_seconds, "max_lora_rank": engine.spec.max_lora_rank,
            # adapter ids in the engine's CPU cache and slots, and the id each served name has now
            "cpu_cache_ids": sorted(reading.cached_adapters) if reading else None,
            "slot_ids": sorted(reading.slot_adapters) if reading else None,
            # the CPU LoRA forms the worker measured on this CPU and chose per batch size
            "lora_forms": reading.lora_forms if reading else None,
            "adapter_ids": {name: lora_id for lora_id, name in host.published_adapters(engine).items()},
        }

    return [described(e) for e in host.engines()]
