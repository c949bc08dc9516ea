"""Per-connection deadlines for the API's HTTP server: unfinished headers and bodies are closed.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but has no limit on how long
a client may take to send a request: a client that sends half its headers, or a Content-Length
and half the body, holds a connection (and a file descriptor, and for a body the ASGI task)
forever. ``deadline_protocol(base, header_timeout_s=N, body_timeout_s=M)`` returns a subclass of
uvicorn's HTTP protocol ``base`` (httptools or h11; both keep the request in ``self.cycle``) with
two timers per connection:

- **headers**: from the connection's first moment (for the first request) or the first byte of
  a later request on a kept-alive connection, the request line and headers must be complete
  within N s. Else the server answers ``408`` ``{"error": "header_timeout"}`` and closes the
  connection (when an earlier response on it is still being written, it closes right after that).
- **body**: from the end of the headers, the whole body must be in within M s, whether or not
  the app reads it. Else ``408`` ``{"error": "body_timeout"}`` when no response has started,
  and the connection is closed either way; the app's ``receive()`` answers ``http.disconnect``.

Timers are armed and checked on the event loop thread only (protocol callbacks), so they need no
lock. ``server_config(app, settings)`` is the uvicorn configuration ``ctp serve`` runs with: these
deadlines over uvicorn's default (``auto``) protocol, no WebSocket support (the API has none).
A reverse proxy in front (nginx ``client_header_timeout`` / ``client_body_timeout``) does the
same job and can replace or complement it.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn

    from service.settings import Settings

# the response written on expiry: JSON like every other API error, and the connection is closed
_REASONS = {
    "header_timeout": "request headers not complete within {} s",
    "body_timeout": "request body not complete within {} s",
}


def timeout_response(code: str, seconds: float) -> bytes:
    """The raw HTTP/1.1 408 written for ``code`` (``header_timeout`` or ``body_timeout``)."""
    body = json.dumps({"error": code, "reason": _REASONS[code].format(f"{seconds:g}")}).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Deadlines:
    """The mixin ``deadline_protocol`` puts in front of a uvicorn HTTP protocol class."""

    header_timeout_s: float
    body_timeout_s: float
    # provided by the uvicorn protocol
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_base: Any = None  # the cycle that was current when the awaited request began
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_cycle: Any = None  # the request whose body is awaited
        self._arm_header()  # a connection that never sends a byte is an unfinished header too

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        in_body = before is not None and before.more_body  # these bytes continue its body
        super().data_received(data)  # type: ignore[misc]
        if not in_body and self.cycle is before:  # a request began, its headers are not all in
            self._arm_header()
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._track()  # h11 parses pipelined requests only now

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header()
        self._cancel_body()
        super().connection_lost(exc)  # type: ignore[misc]

    # -- timers ----------------------------------------------------------------------------------

    def _arm_header(self) -> None:
        if self._header_timer is None:
            self._header_base = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_expired)

    def _cancel_header(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _track(self) -> None:
        """After the parser ran: headers complete cancel the header timer and start the body's."""
        cycle = self.cycle
        if cycle is not self._header_base:
            self._cancel_header()
        if cycle is not self._body_cycle:
            self._cancel_body()
            self._body_cycle = cycle
            if cycle is not None and cycle.more_body:
                self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_expired)
        elif cycle is not None and not cycle.more_body:
            self._cancel_body()

    def _header_expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not self._header_base:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # an earlier response is being written: close after it
            return
        self._close_with("header_timeout", self.header_timeout_s)

    def _body_expired(self) -> None:
        self._body_timer = None
        cycle = self._body_cycle
        if self.transport.is_closing() or cycle is None or not cycle.more_body:
            return
        if not cycle.response_started:
            self._close_with("body_timeout", self.body_timeout_s)
        else:
            self.transport.close()
        cycle.disconnected = True  # the app's receive() answers http.disconnect, its sends are dropped
        cycle.message_event.set()

    def _close_with(self, code: str, seconds: float) -> None:
        self.transport.write(timeout_response(code, seconds))
        self.transport.close()


def deadline_protocol(
    base: type[asyncio.Protocol], *, header_timeout_s: float, body_timeout_s: float
) -> type[asyncio.Protocol]:
    """A subclass of the uvicorn HTTP protocol ``base`` that enforces both deadlines."""
    return type(
        f"Deadline{base.__name__}",
        (_Deadlines, base),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )


def server_config(app: Any, settings: Settings, *, http: str = "auto", **kwargs: Any) -> uvicorn.Config:
    """The uvicorn ``Config`` the API runs with: ``settings``' host, port and deadlines over the
    ``http`` protocol (``auto``: httptools when installed, else h11); ``kwargs`` go to ``Config``."""
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    protocol = deadline_protocol(
        import_from_string(HTTP_PROTOCOLS[http]),
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    options = {"host": settings.api_host, "port": settings.api_port, "ws": "none", **kwargs}
    return uvicorn.Config(app, http=protocol, **options)
