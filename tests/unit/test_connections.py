"""The server's HTTP protocol (`api/connections.py`) on a real uvicorn server: a connection
that does not complete a request's headers in time is closed; a request whose headers
arrived is served however long it takes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvicorn

from adapterserve.api.connections import server_protocol

DEADLINE = 0.5


async def slow_app(scope, receive, send):
    """Answers after a second and a half: three times the header deadline."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(3 * DEADLINE)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def port():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(slow_app, http=server_protocol(DEADLINE), timeout_keep_alive=30, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield listening.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def closed_by_server(connection: socket.socket, wait: float = 10.0) -> bool:
    """Whether the server closes the connection within `wait` seconds (EOF, nothing sent)."""
    connection.settimeout(wait)
    try:
        return connection.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_a_connection_sending_headers_slowly_is_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert closed_by_server(connection)


def test_a_silent_connection_is_closed(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        assert closed_by_server(connection)


def test_a_request_whose_headers_arrived_is_answered_however_long_it_takes_and_the_next_gets_its_deadline(port):
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.settimeout(10)
        connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok"):
            chunk = connection.recv(1024)
            assert chunk, f"closed before the answer: {answer!r}"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        connection.sendall(b"GET / HTTP/1.1\r\n")  # the next request on the connection, slowly
        assert closed_by_server(connection)
