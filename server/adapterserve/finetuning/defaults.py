"""What `auto` means in a fine-tuning job, and the bounds of each value a job may set:
shared by the API (api/fine_tuning.py) and `adapterserve compare`'s training rows, so
both train the same way."""

from __future__ import annotations

DEFAULTS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}  # the demo adapters train so
BASE_LEARNING_RATE = 2e-3  # x learning_rate_multiplier, for adapters
FULL_BASE_LEARNING_RATE = 1e-5  # x learning_rate_multiplier, every weight (dedicated mode): far smaller steps
LORA_DEFAULTS = {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 64), "learning_rate_multiplier": (1e-3, 10.0), "rank": (1, 64), "alpha": (1, 512)}


def learning_rate(full: bool, multiplier: float = 1.0) -> float:
    return (FULL_BASE_LEARNING_RATE if full else BASE_LEARNING_RATE) * multiplier
