"""Only requests addressed to this server's names are answered (the Host header), so a web
page on another site cannot reach a server on localhost by pointing its own name at
127.0.0.1 (DNS rebinding). Answers an OpenAI error body, unlike Starlette's
TrustedHostMiddleware (plain text), which this otherwise follows."""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, render

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(listen_host: str) -> list[str]:
    """A server listening on a loopback address answers only loopback names; one listening
    elsewhere is reached under names nobody can list here: any (set allowed_hosts)."""
    if listen_host == "localhost":
        return list(LOOPBACK_NAMES)
    try:
        return list(LOOPBACK_NAMES) if ipaddress.ip_address(listen_host).is_loopback else ["*"]
    except ValueError:  # a host name to listen on
        return ["*"]


def _name(host_header: str) -> str:
    """The host name of a Host header, without port or IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class AllowedHosts:
    def __init__(self, app: ASGIApp, hosts: list[str]):
        self.app = app
        self.any = "*" in hosts
        self.hosts = {h.lower().strip("[]") for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.any:
            name = _name(Headers(scope=scope).get("host", ""))
            if name not in self.hosts:
                refusal = APIError(400, f"This server does not answer the host {name!r} (allowed_hosts).", code="invalid_host")
                await render(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)
