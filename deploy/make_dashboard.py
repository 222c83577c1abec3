"""Writes deploy/grafana/dashboards/adapterserve.json: the dashboard as data, so each panel
is one line here (title, unit, queries) and the JSON stays consistent.

    python deploy/make_dashboard.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# (row, [(panel title, unit, stacked, [(legend, PromQL), ...]), ...])
ROWS = [
    ("Memory by component", [
        ("Engine memory by component (stacked)", "bytes", True, [
            ("{{engine}} {{component}}", "sum by (engine, component) (adapterserve_engine_memory_bytes)"),
        ]),
        ("Engine process memory (USS)", "bytes", True, [
            ("{{engine}} {{process}}", "sum by (engine, process) (adapterserve_engine_process_memory_bytes)"),
        ]),
        ("KV cache: in use vs reserved", "bytes", False, [
            ("{{engine}} in use", "adapterserve_kv_cache_used_bytes"),
            ("{{engine}} reserved", 'adapterserve_engine_memory_bytes{component="kv_cache"}'),
        ]),
    ]),
    ("Shared vs dedicated: the same tasks", [
        ("Hosting memory for the current tasks", "bytes", False, [
            ("{{mode}} ({{basis}})", "adapterserve_hosting_memory_bytes"),
        ]),
        ("Shared / dedicated memory", "percentunit", False, [
            ("shared / dedicated", 'adapterserve_hosting_memory_bytes{mode="shared",basis="derived"} / ignoring(mode) adapterserve_hosting_memory_bytes{mode="dedicated",basis="derived"}'),
        ]),
        ("Storage on disk", "bytes", True, [
            ("{{component}}", "adapterserve_storage_bytes"),
        ]),
        ("Storage per task", "bytes", False, [
            ("{{task}} ({{kind}})", "adapterserve_task_storage_bytes"),
        ]),
    ]),
    ("Adapters by tier", [
        ("Adapters by kind and tier", "short", False, [
            ("{{kind}} {{tier}}", "sum by (kind, tier) (adapterserve_adapters)"),
        ]),
        ("Adapter loads and evictions per second", "ops", False, [
            ("{{kind}} loads", "sum by (kind) (rate(adapterserve_adapter_loads_total[5m]))"),
            ("{{kind}} evictions", "sum by (kind) (rate(adapterserve_adapter_evictions_total[5m]))"),
        ]),
        ("Mean adapter load time", "s", False, [
            ("{{kind}}", "sum by (kind) (adapterserve_adapter_load_seconds_sum) / sum by (kind) (adapterserve_adapter_load_seconds_count)"),
        ]),
    ]),
    ("Traffic and latency per adapter", [
        ("Requests per second", "reqps", True, [
            ("{{model}} {{endpoint}} {{status}}", "sum by (model, endpoint, status) (rate(adapterserve_requests_total[1m]))"),
        ]),
        ("Generated tokens per second", "short", True, [
            ("{{model}}", "sum by (model) (rate(adapterserve_generation_tokens_total[1m]))"),
        ]),
        ("Time to first token p50 / p99", "s", False, [
            ("{{model}} p50", "histogram_quantile(0.5, sum by (le, model) (rate(adapterserve_time_to_first_token_seconds_bucket[5m])))"),
            ("{{model}} p99", "histogram_quantile(0.99, sum by (le, model) (rate(adapterserve_time_to_first_token_seconds_bucket[5m])))"),
        ]),
        ("End-to-end latency p99", "s", False, [
            ("{{model}} {{endpoint}}", "histogram_quantile(0.99, sum by (le, model, endpoint) (rate(adapterserve_request_duration_seconds_bucket[5m])))"),
        ]),
        ("Requests running in the engine (vLLM)", "short", False, [
            ("{{model_name}}", "sum by (model_name) (vllm:num_requests_running)"),
        ]),
    ]),
    ("Fine-tuning", [
        ("Fine-tuning jobs by state", "short", True, [
            ("{{state}}", "sum by (state) (adapterserve_fine_tuning_jobs)"),
        ]),
        ("Tokens trained per second", "short", False, [
            ("trained", "sum(rate(adapterserve_fine_tuning_trained_tokens_total[5m]))"),
        ]),
        ("Jobs finished", "short", False, [
            ("{{state}}", "sum by (state) (adapterserve_fine_tuning_job_seconds_count)"),
        ]),
    ]),
    ("Dedicated mode: swaps", [
        ("Model swaps", "short", False, [
            ("{{model}}", "sum by (model) (adapterserve_model_swap_seconds_count)"),
        ]),
        ("Mean swap time", "s", False, [
            ("{{model}}", "sum by (model) (adapterserve_model_swap_seconds_sum) / sum by (model) (adapterserve_model_swap_seconds_count)"),
        ]),
    ]),
]


# On Ray Serve every replica's series carries a `replica` label (the ingress merges their
# pages); the selector narrows every panel to some replicas. Single-machine series have no
# such label and `=~".*"` (All) matches them too.
REPLICA_SELECTOR = 'replica=~"$replica"'
METRIC = re.compile(r"\b((?:adapterserve_|vllm:)[a-z0-9_:]+)(\{([^}]*)\})?")


def with_replica(expr: str) -> str:
    """The query with the replica selector on every adapterserve and vLLM series."""
    def add(match: re.Match) -> str:
        labels = match.group(3)
        return f"{match.group(1)}{{{REPLICA_SELECTOR}{',' + labels if labels else ''}}}"

    return METRIC.sub(add, expr)


REPLICA_VARIABLE = {
    "name": "replica", "label": "Replica (Ray Serve)", "type": "query", "datasource": DATASOURCE,
    "query": {"query": "label_values(adapterserve_adapters, replica)", "refId": "replicas"},
    "definition": "label_values(adapterserve_adapters, replica)",
    "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2,
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
}


def panel(panel_id: int, title: str, unit: str, stacked: bool, queries, x: int, y: int) -> dict:
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"stacking": {"mode": "normal" if stacked else "none"}, "fillOpacity": 30 if stacked else 0}},
            "overrides": [],
        },
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": with_replica(expr), "legendFormat": legend}
            for i, (legend, expr) in enumerate(queries)
        ],
    }


def dashboard() -> dict:
    panels, panel_id, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for index, (title, unit, stacked, queries) in enumerate(row_panels):
            x = (index % 3) * 8
            if index and index % 3 == 0:
                y += 8
            panels.append(panel(panel_id, title, unit, stacked, queries, x, y))
            panel_id += 1
        y += 8
    return {
        "uid": "adapterserve",
        "title": "adapterserve: where the memory goes",
        "tags": ["adapterserve", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "panels": panels,
        "templating": {"list": [REPLICA_VARIABLE]},
        "annotations": {"list": []},
    }


def main() -> None:
    out = Path(__file__).parent / "grafana" / "dashboards" / "adapterserve.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
