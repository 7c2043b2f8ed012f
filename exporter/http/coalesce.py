"""One write per response: uvicorn's HTTP protocol with its writes coalesced.

uvicorn writes a response's status line and headers with one `transport.write()` and
its body with another, and uvloop sends each at once: two `send()` system calls, and on
loopback the kernel delivers each segment to the reader inside the writer's call. Most
of our answers (a Dovecot policy decision, /livez) are one small body written in the
same event-loop step as its headers, so the writes of one step are held and sent
together at the end of the step: one system call and one TCP segment instead of two.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes made in one loop step go out as one write.

    Everything but write, close, write_eof and abort is the wrapped transport's own, so
    flow control (pause_writing from the real transport) works as before.
    """

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            self._pending.append(data)

    def flush(self) -> None:
        """Sends what this step wrote (also called before closing)."""
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        held = sum(map(len, self._pending)) if self._pending else 0
        return held + self._transport.get_write_buffer_size()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a CoalescingTransport (uvicorn.Config(http=...))."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # uvloop's transports are asyncio.Transport in behaviour, not by subclassing
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
