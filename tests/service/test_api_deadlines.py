"""The API server's deadlines on unfinished requests (service.serve.api.deadlines), over raw sockets
against the real app under uvicorn, with both of uvicorn's HTTP parsers: half-sent headers (and
connections that send nothing) get 408 and are closed after CTP_HEADER_TIMEOUT_S, half-sent
bodies after CTP_BODY_TIMEOUT_S (408 when no response started, closed either way), while complete
requests, slow ones within the deadlines included, are answered as usual."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from service.local.infra import free_port
from service.serve.api.app import create_app
from service.serve.api.deadlines import server_config
from service.serve.sources import DirectorySource
from service.settings import load_settings
from tests.service.api_support import ServerThread

HEADER_S = 1.0
BODY_S = 1.5
MARGIN_S = 1.5  # allowed past a deadline on a loaded 2-core machine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["h11", "httptools"])
def server(request, tmp_path):
    s = load_settings(
        data_dir=tmp_path,
        api_port=free_port(),
        api_host="127.0.0.1",
        header_timeout_s=HEADER_S,
        body_timeout_s=BODY_S,
    )
    app = create_app(s, source=DirectorySource(tmp_path / "none"))  # no model: /classify is 503
    config = server_config(
        app, s, http=request.param, log_level="warning", lifespan="on", timeout_graceful_shutdown=5
    )
    srv = ServerThread(app, config=config).start()
    try:
        yield srv
    finally:
        srv.stop()


def _send(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def _silent_and_open(sock: socket.socket) -> bool:
    """Nothing to read and not closed (a peek that would block)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.setblocking(True)
    return False


def _read_to_close(sock: socket.socket, deadline: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes, and when it closed (None: still open at deadline)."""
    data = b""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            part = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return data, time.monotonic()
        if not part:
            return data, time.monotonic()
        data += part
    return data, None


HALF_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slow"
HALF_BODY_READ = (  # /ingest reads the body first: the app waits in receive()
    b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    b'{"id": "a", '
)
HALF_BODY_UNREAD = (  # /classify without a model answers 503 at once and never reads the body
    b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    b'{"image": '
)


def test_unfinished_headers_and_bodies_are_closed_while_others_are_served(server):
    n = 25  # 100 connections held at once, as in the report (50 headers, 50 bodies)
    t0 = time.monotonic()
    quiet = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n)]
    headers = [_send(server.port, HALF_HEADERS) for _ in range(n)]
    bodies = [_send(server.port, HALF_BODY_READ) for _ in range(n)]
    unread = [_send(server.port, HALF_BODY_UNREAD) for _ in range(n)]
    # the server still answers complete requests, and held connections are not closed early
    with httpx.Client(base_url=server.url, timeout=5) as c:
        assert c.get("/healthz").status_code == 200
        time.sleep(max(0.0, t0 + HEADER_S * 0.6 - time.monotonic()))
        assert all(_silent_and_open(s) for s in quiet + headers + bodies)
        assert c.get("/healthz").status_code == 200
    for sock in quiet + headers:
        data, closed = _read_to_close(sock, t0 + HEADER_S + MARGIN_S)
        assert closed is not None, "an unfinished header was not closed in time"
        assert data.startswith(b"HTTP/1.1 408 ") and b'"header_timeout"' in data, data
        assert b"connection: close" in data.lower()
    for sock in bodies:
        data, closed = _read_to_close(sock, t0 + BODY_S + MARGIN_S)
        assert closed is not None and closed - t0 >= BODY_S * 0.9, "a half body was not closed on time"
        assert data.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in data, data
    for sock in unread:  # answered at once, then closed at the body deadline all the same
        data, closed = _read_to_close(sock, t0 + BODY_S + MARGIN_S)
        assert data.startswith(b"HTTP/1.1 503 "), data
        assert closed is not None and closed - t0 >= BODY_S * 0.9, "a half body was not closed on time"
    for sock in quiet + headers + bodies + unread:
        sock.close()
    with httpx.Client(base_url=server.url, timeout=5) as c:  # nothing of that broke the server
        assert c.get("/healthz").status_code == 200


def test_the_header_deadline_counts_from_a_later_requests_first_byte(server):
    sock = _send(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    time.sleep(HEADER_S * 0.7)  # idle on a kept-alive connection (uvicorn's keep-alive is 5 s)
    t1 = time.monotonic()
    sock.sendall(HALF_HEADERS)
    time.sleep(HEADER_S * 0.6)  # past the first request's header deadline, not past this one's
    assert _silent_and_open(sock)
    data, closed = _read_to_close(sock, t1 + HEADER_S + MARGIN_S)
    assert closed is not None and b'"header_timeout"' in data, data
    sock.close()


def test_slow_requests_within_the_deadlines_are_answered(server):
    body = b'{"id": "slow", "text": "a cat"}'  # no image: ingest's validation answers 422
    head = (
        b"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    for piece in (head[:10], head[10:40], head[40:]):  # headers over ~0.6 s < HEADER_S
        sock.sendall(piece)
        time.sleep(HEADER_S * 0.3)
    for piece in (body[:5], body[5:]):  # body over ~0.9 s < BODY_S
        sock.sendall(piece)
        time.sleep(BODY_S * 0.3)
    data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 422 "), data
    assert _silent_and_open(sock)  # kept alive: neither deadline applies to a finished request
    sock.close()
