"""The one HTTP middleware of the API, pure ASGI: it makes the request's context
(request_context.py) before anything else runs, and ends the request when its answer
ends (streams: before their last message leaves, so a client that sends its next
request at once finds the last one counted and its place given back).

Listeners are called with the context: `on_status(context, status)` once the status is
known, `on_end(context, status, seconds)` once, when the answer has ended or the request
was given up. Pure ASGI (no `BaseHTTPMiddleware`): the route runs in this middleware's
task, so the context variable set here is the route's, and streams pass through unwrapped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from adapterserve.request_context import RequestContext, begin

log = logging.getLogger(__name__)

ENDPOINTS = {
    "/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/responses": "responses", "/v1/classify": "classify",
}


class RequestContextMiddleware:
    def __init__(self, app, on_status: list[Callable] | None = None, on_end: list[Callable] | None = None):
        self.app = app
        self.on_status = on_status if on_status is not None else []
        self.on_end = on_end if on_end is not None else []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = begin(RequestContext(endpoint=ENDPOINTS.get(scope["path"])))
        scope.setdefault("state", {})["context"] = context
        began = time.perf_counter()
        status = 500  # if the app fails before it answers
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            for listener in self.on_end:
                self._call(listener, context, status, time.perf_counter() - began)

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for listener in self.on_status:
                    self._call(listener, context, status)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                end()  # before the last message: the client sees the end after it is counted
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            end()  # given up (disconnect, cancellation, failure) before its last message

    @staticmethod
    def _call(listener, *args) -> None:
        try:
            listener(*args)
        except Exception:  # a listener's failure never fails the request
            log.exception("request listener %r failed", listener)


def context_of(request) -> RequestContext:
    """The context of a Starlette request (made by the middleware)."""
    return request.scope.setdefault("state", {}).setdefault("context", RequestContext())
