"""One write per response: the coalescing transport alone, then under a real uvicorn server
on loopback with real HTTP clients (keep-alive, a streamed body, HEAD, connection: close)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx
import pytest
import uvicorn

from exporter.http import coalesce
from exporter.http.coalesce import CoalescingHttpToolsProtocol, CoalescingTransport


class Recorder:
    """The inner transport: what actually went to the socket."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = self.eof = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 7

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


async def test_writes_of_one_step_go_out_as_one_write_at_its_end():
    inner = Recorder()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"ok")
    assert inner.writes == [] and transport.get_write_buffer_size() == 40 + 7
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    transport.write(b"next")  # a later step: its own write
    await asyncio.sleep(0)
    assert inner.writes[1:] == [b"next"]
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the inner's


async def test_close_and_write_eof_send_what_is_held_first_abort_drops_it():
    inner = Recorder()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"a")
    transport.write_eof()
    assert inner.writes == [b"a"] and inner.eof
    transport.write(b"b")
    transport.close()
    assert inner.writes == [b"a", b"b"] and inner.closed
    await asyncio.sleep(0)  # the flush scheduled for b finds nothing left
    assert inner.writes == [b"a", b"b"]
    aborted = Recorder()
    transport = CoalescingTransport(aborted, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"lost")
    transport.abort()
    await asyncio.sleep(0)
    assert aborted.writes == [] and aborted.aborted


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["path"] == "/stream":  # 1 MiB in 64 chunks, chunked transfer encoding
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(64):
            await send({"type": "http.response.body", "body": bytes([65 + i % 26]) * 16384,
                        "more_body": True})
            await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"status":0,"msg":""}'
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch):
    sent: list[int] = []  # the number of pieces each real write joined
    real_flush = CoalescingTransport.flush

    def counting_flush(self: CoalescingTransport) -> None:
        if self._pending:
            sent.append(len(self._pending))
        real_flush(self)

    monkeypatch.setattr(coalesce.CoalescingTransport, "flush", counting_flush)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None,
                            access_log=False, http=CoalescingHttpToolsProtocol)
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}", sent
    srv.should_exit = True
    await task


async def test_a_real_server_sends_each_small_answer_in_one_write(server):
    url, sent = server
    async with httpx.AsyncClient() as client:  # one keep-alive connection
        for _ in range(5):
            r = await client.post(url + "/dovecot/policy", content=b"{}")
            assert r.status_code == 200 and r.json() == {"status": 0, "msg": ""}
        head = await client.head(url + "/")
        assert head.status_code == 200 and head.content == b""
        streamed = await client.get(url + "/stream")
        closing = await client.get(url + "/", headers={"connection": "close"})
    assert streamed.content == b"".join(bytes([65 + i % 26]) * 16384 for i in range(64))
    assert closing.json() == {"status": 0, "msg": ""}
    # headers and body of each of the 5 answers in one write; a HEAD has no body
    assert sent[:6] == [2, 2, 2, 2, 2, 1]
    assert sent[-1] == 2  # the answer that closed the connection was sent before the close
    # the stream: its headers with the first chunk, then one write per step (63 chunks, the
    # end of the chunked body): nothing held across an await
    assert sent[6:-1] == [2] + [1] * 63 + [1]
