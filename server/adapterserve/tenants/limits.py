"""Per-key limits: requests and tokens in the last minute, requests in flight.

A sliding window of one minute: a request is admitted while the key's requests (and
tokens) of the last 60 s stay under its limits; otherwise 429 with the seconds until the
oldest leaves the window as Retry-After. Tokens are known only once a request has run,
so they count against the requests that come after it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from adapterserve.errors import LimitExceeded

from .keys import KeyEntry

WINDOW_S = 60.0


@dataclass
class _Usage:
    requests: deque = field(default_factory=deque)  # admission times
    tokens: deque = field(default_factory=deque)  # (time, tokens)
    in_flight: int = 0

    def forget_before(self, moment: float) -> None:
        while self.requests and self.requests[0] <= moment:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= moment:
            self.tokens.popleft()


class RateLimitExceeded(LimitExceeded):
    """Over one of the key's limits: retry after the seconds until the oldest request (or
    tokens) leaves the window, rounded up."""

    def __init__(self, reason: str, message: str, retry_after: float):
        super().__init__(reason, message, max(1, math.ceil(retry_after)))


class TenantLimiter:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._usage: dict[str, _Usage] = {}

    def admit(self, key: KeyEntry) -> None:
        """Count one request of `key`, or raise RateLimitExceeded (nothing counted)."""
        limits, now = key.limits, self.clock()
        usage = self._usage.setdefault(key.id, _Usage())
        usage.forget_before(now - WINDOW_S)
        if limits.concurrent_requests is not None and usage.in_flight >= limits.concurrent_requests:
            raise RateLimitExceeded(
                "concurrent_requests", f"Too many requests in flight for this key (limit {limits.concurrent_requests}).", 1,
            )
        if limits.requests_per_minute is not None and len(usage.requests) >= limits.requests_per_minute:
            raise RateLimitExceeded(
                "requests_per_minute", f"Rate limit reached: {limits.requests_per_minute} requests per minute for this key.",
                usage.requests[0] + WINDOW_S - now,
            )
        if limits.tokens_per_minute is not None:
            used = sum(tokens for _, tokens in usage.tokens)
            if used >= limits.tokens_per_minute:
                raise RateLimitExceeded(
                    "tokens_per_minute", f"Rate limit reached: {limits.tokens_per_minute} tokens per minute for this key.",
                    usage.tokens[0][0] + WINDOW_S - now,
                )
        usage.requests.append(now)
        usage.in_flight += 1

    def release(self, key: KeyEntry) -> None:
        usage = self._usage.get(key.id)
        if usage is not None and usage.in_flight > 0:
            usage.in_flight -= 1

    def record_tokens(self, key_id: str, tokens: int) -> None:
        if tokens > 0:
            self._usage.setdefault(key_id, _Usage()).tokens.append((self.clock(), tokens))
