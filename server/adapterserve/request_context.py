"""What one request carries from where it arrives to the code that runs deeper in it: one
object per request, in one context variable.

The API's middleware (api/middleware.py, pure ASGI) makes it for every HTTP request and
sets it before the route runs, so the route, its dependencies, the engine client's
traffic observer (metrics/traffic.py) and the middleware's end of the request all see the
same object; a Ray Serve replica makes one for each request it runs. A leaf: it imports
nothing of adapterserve.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass
class RequestContext:
    endpoint: str | None = None  # "chat", "completion", "responses", "classify"; None: not an API endpoint
    key: Any = None  # the tenant key it came with (keys file), if any
    admin_tenant: Any = None  # the tenant key an admin request came with (None: the server's admin key)
    target: Any = None  # where the host sent it (hosting.protocol.Target)
    rejection: str | None = None  # why a tenant's request was refused (model_not_allowed, a limit)
    admitted: Any = None  # the key whose limits count it, until it ends
    traffic: list | None = None  # where the engine's traffic observer also reports (a Ray replica)


_current: ContextVar[RequestContext | None] = ContextVar("adapterserve_request", default=None)


def current() -> RequestContext:
    """The running request's context (an empty one outside any request)."""
    return _current.get() or RequestContext()


def begin(context: RequestContext) -> RequestContext:
    """Make `context` the running request's (for this task and the tasks it starts)."""
    _current.set(context)
    return context
