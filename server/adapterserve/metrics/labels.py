"""The cap on model label values: thousands of adapters must not mean thousands of series.

The busiest `limit` models by traffic get series of their own; the rest count as `other`.
A model without series takes the place of the least busy labelled one once it has more
than twice its traffic (the margin keeps two equally busy models from trading places on
every request); the displaced model's series are removed and it counts as `other` from
then on, as Prometheus expects of a series that ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

OTHER = "other"
# A newcomer displaces the least busy labelled model only with this many times its traffic.
DISPLACE_FACTOR = 2


class ModelLabels:
    def __init__(self, limit: int, on_displaced: Callable[[str], None] = lambda model: None):
        self.limit = limit
        self.on_displaced = on_displaced
        self.traffic: Counter[str] = Counter()
        self.labelled: set[str] = set()

    def count(self, model: str | None) -> str:
        """Count one request for `model` and return the label value to record it under."""
        if model is None:
            return OTHER
        self.traffic[model] += 1
        return self.label(model)

    def label(self, model: str | None) -> str:
        """The label value for `model` without counting traffic."""
        if model is None:
            return OTHER
        if model in self.labelled:
            return model
        if len(self.labelled) < self.limit:
            self.labelled.add(model)
            return model
        weakest = min(self.labelled, key=lambda name: (self.traffic[name], name))
        if self.traffic[model] > DISPLACE_FACTOR * self.traffic[weakest]:
            self.labelled.discard(weakest)
            self.on_displaced(weakest)
            self.labelled.add(model)
            return model
        return OTHER
