"""The key a request came with, for the code that runs deeper in the same request (the
engine's traffic observer counts tokens per tenant with it)."""

from __future__ import annotations

from contextvars import ContextVar

current_key: ContextVar = ContextVar("adapterserve_current_key", default=None)
