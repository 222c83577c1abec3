"""Building adapters with peft (LoRA and heads) and merging them into full models."""
