"""The HTTP protocol the server's connections run: uvicorn's, with a deadline for headers.

uvicorn times out a keep-alive connection only once a response is complete, and never a
connection whose request headers have not all arrived: a client that opens connections and
sends a header line now and then (slowloris) keeps each one open for as long as it likes.
With `--max-connections` of them the server answers everyone else with 503s. Here every
connection must complete a request's headers within `header_timeout_s` of opening, or of
the last response on it; otherwise it is closed. A request whose headers arrived is not
affected however long its body or its answer takes (bodies have their own size limits,
`api/serving.py`).
"""

from __future__ import annotations

import asyncio


def with_header_deadline(protocol: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """`protocol` (one of uvicorn's HTTP protocol classes) closing connections that do not
    complete a request's headers within `seconds`."""

    class HeaderDeadline(protocol):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()  # the next request on the connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._header_timer = self.loop.call_later(seconds, self._header_deadline_passed)

        def _cancel_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline_passed(self) -> None:
            self._header_timer = None
            cycle = self.cycle  # uvicorn's request in progress, made once its headers are in
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{protocol.__name__}"
    return HeaderDeadline


def server_protocol(seconds: float) -> type[asyncio.Protocol]:
    """The protocol uvicorn would choose (httptools where installed, else h11), with the deadline."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return with_header_deadline(AutoHTTPProtocol, seconds)
