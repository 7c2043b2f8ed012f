"""Cross-cutting HTTP concerns in one pure ASGI middleware: auth, body limit, metrics."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from exporter.http.auth import ListenerAuth
    from exporter.service import Exporter


class BodyTooLarge(Exception):
    pass


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class Guard:
    """Authenticates the listener, caps request bodies and counts every request."""

    def __init__(self, app: ASGIApp, exporter: Exporter, auth: ListenerAuth):
        self.app = app
        self.exporter = exporter
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper)
        except BodyTooLarge:
            if not started:
                await send_json(send_wrapper, 413, self._too_large())
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", "other") if route is not None else "other"
            self.exporter.http_requests.inc((handler, str(status)))
            self.exporter.http_duration.observe((handler,), time.perf_counter() - start)

    def _too_large(self) -> dict[str, Any]:
        limit = self.exporter.config["server"]["max_request_body_bytes"]
        return {"error": "payload_too_large", "message": f"request body over {limit} bytes"}

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = self.auth
        if auth.needs_auth(scope["path"]) and not await auth.allows(
                header(scope, b"authorization")):
            await send_json(send, 401, {"error": "unauthorized",
                                        "message": "valid credentials required"},
                            [(b"www-authenticate", b'Basic realm="a3mailer-exporter"')
                             if auth.users else (b"www-authenticate", b"Bearer")])
            return
        limit = self.exporter.config["server"]["max_request_body_bytes"]
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await send_json(send, 413, self._too_large())
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        await self.app(scope, limited_receive, send)
