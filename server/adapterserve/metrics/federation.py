"""One /metrics page for an application of several processes (Ray Serve): every replica's
samples with a `replica` label, merged family by family with the ingress's own samples.

Prometheus scrapes the ingress once and sees every replica; `sum(...)` over a hosting
gauge adds the replicas up, and `by (replica)` splits them. A family must appear once on
a page, so the pages are parsed and merged, not concatenated.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return self.families


def merge_pages(own: bytes, pages: list[tuple[str, str]]) -> bytes:
    """The ingress's page (no replica label) merged with (replica, page) pairs."""
    families: dict[str, Metric] = {}

    def add(text: str, replica: str | None) -> None:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labels = dict(sample.labels)
                if replica is not None:
                    labels[REPLICA_LABEL] = replica
                merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))

    add(own.decode(), None)
    for replica, text in pages:
        add(text if isinstance(text, str) else text.decode(), replica)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
