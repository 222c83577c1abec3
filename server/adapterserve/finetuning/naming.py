"""The names of what a fine-tuning job produces: the adapter it registers
(`ft-<suffix>-<id>`, a safe model name and a store folder) and the `fine_tuned_model`
clients use, OpenAI's form `ft:<base>:<suffix>:<id>`. One maps to the other without a
table, so the name answers with no lookup, on every replica."""

from __future__ import annotations

import re

SUFFIX = re.compile(r"[A-Za-z0-9_.-]{1,40}")
DEFAULT_SUFFIX = "custom"


def _short(job_id: str) -> str:
    return job_id.rsplit("-", 1)[-1][:12]


def adapter_name(job: dict) -> str:
    return f"ft-{job['body'].get('suffix') or DEFAULT_SUFFIX}-{_short(job['id'])}"


def fine_tuned_model(job: dict, base_name: str) -> str:
    return f"ft:{base_name}:{job['body'].get('suffix') or DEFAULT_SUFFIX}:{_short(job['id'])}"


def adapter_of(model: str, base_name: str | None) -> str | None:
    """The adapter a `ft:<base>:<suffix>:<id>` name means, or None for any other name."""
    parts = model.split(":")
    if len(parts) == 4 and parts[0] == "ft" and parts[1] == base_name and SUFFIX.fullmatch(parts[2]) and parts[3]:
        return f"ft-{parts[2]}-{parts[3]}"
    return None
