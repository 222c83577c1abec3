"""Pool the rounds of several `bench/lora_rank_fit.py` runs, per variant: the mean tok/s
of each scenario over every round, its ratio to base-only (ratio of the means), and the
median of the per-round ratios (each mixed round against the same round's base-only).

This VM's speed moves by ±10-15% from round to round, so a comparison of variants rests
on many rounds in several runs, with the variants interleaved (A B B A).

Reproduce with:

    .venv/bin/python bench/pool_rounds.py bench/results/RUN1.json bench/results/RUN2.json ...
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BASE = "base only"


def pooled(paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """variant -> scenario -> tok/s of every round (in the order run), from all files."""
    rounds: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            for result in run["results"]:
                rounds[run["variant"]][result["scenario"]].extend(result["rounds_tokens_per_second"])
    return rounds


def table(rounds: dict[str, dict[str, list[float]]]) -> str:
    scenarios = [s for s in next(iter(rounds.values())) if s != BASE]
    lines = [
        "| variant | rounds | base tok/s | " + " | ".join(f"{s} tok/s (vs base; median of rounds)" for s in scenarios) + " |",
        "|---|---|---|" + "---|" * len(scenarios),
    ]
    for variant, by_scenario in rounds.items():
        base = by_scenario[BASE]
        cells = []
        for scenario in scenarios:
            mixed = by_scenario[scenario]
            per_round = [m / b for m, b in zip(mixed, base)]
            cells.append(f"{statistics.mean(mixed):.1f} ({statistics.mean(mixed) / statistics.mean(base):.2f}; "
                         f"{statistics.median(per_round):.2f})")
        lines.append(f"| {variant} | {len(base)} | {statistics.mean(base):.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths:
        raise SystemExit(__doc__)
    machines = {json.dumps(json.loads(p.read_text())["machine"], sort_keys=True) for p in paths}
    print("\n".join(machines))
    print(table(pooled(paths)))


if __name__ == "__main__":
    main()
