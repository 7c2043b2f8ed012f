"""Cross-cutting HTTP concerns in one pure ASGI middleware: auth, body limit, metrics,
latency (the performance monitor) and tracing (a SERVER span per request)."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter import tracing
from exporter.http.auth import SELF_AUTHENTICATED, Identity, identify
from security.ratelimit import Limit, RateLimiter, headers
from security.store import StoreUnavailable, is_outage

if TYPE_CHECKING:
    from exporter.config import Config
    from exporter.http.auth import ListenerAuth
    from exporter.service import Exporter

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()  # as JSONResponse writes it
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


# The answer to any request the security store could not serve (Redis or the disk away):
# 503, for the caller to try again, instead of a 500 and a traceback per request.
STORE_UNAVAILABLE = {"error": "store_unavailable",
                     "message": "the security store is unavailable; try again later"}
STORE_RETRY_AFTER = [(b"retry-after", b"5")]


def outage_classes(config: Config) -> tuple[type[Exception], ...]:
    """The exceptions that mean the store is away: StoreUnavailable, and redis-py's
    connection and timeout errors when the Redis store is configured (redis is imported
    with that store, not otherwise)."""
    security = config["security"]
    if not (security["enabled"] and security["store"]["type"] == "redis"):
        return (StoreUnavailable,)
    from redis import exceptions

    return StoreUnavailable, exceptions.ConnectionError, exceptions.TimeoutError


def count_store_outage(exporter: Exporter, cause: str) -> None:
    """Counted with the engine's own store errors (operation "api"), logged in one line."""
    if exporter.security is not None:
        stats = exporter.security.stats
        stats.count(stats.store_errors, "api")
    log.warning("security store failed", extra={"operation": "api", "error": cause})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def api_limits(config: dict[str, Any]) -> dict[str, Limit] | None:
    """security.rate_limits as GCRA limits per client class; None when rate limiting is off."""
    security = config["security"]
    if not security["enable_rate_limiting"]:
        return None
    from exporter.config import parse_duration

    limits = security["rate_limits"]
    window = parse_duration(limits["window_duration"])
    burst = limits["burst_allowance"]
    return {"authenticated": Limit(limits["authenticated_requests_per_minute"] * window / 60,
                                   window, burst),
            "anonymous": Limit(limits["anonymous_requests_per_minute"] * window / 60,
                               window, burst)}


class DirectRoute:
    """One route of a Starlette app, called the way the app's middleware stack and router
    call it, without going through them.

    The Dovecot policy route takes two requests per login; Starlette's two middleware
    (each wrapping send, one building a Request) and its route matching cost about a
    twelfth of such a request (36,000 of an allow request's 415,000 instructions in
    process, through uvicorn's protocol, callgrind). For a request the router would hand
    to this route (the route comes first in the table), this sets the scope entries the
    router sets and answers an exception as those middleware do: an exception class the app has a
    handler for gets that handler's answer, anything else the app's 500 handler's
    answer and is raised on to the server. tests/unit/test_http.py compares it with the
    way through the app.
    """

    def __init__(self, app: Starlette, route: Route) -> None:
        assert route.methods, "a route without methods takes any: leave it to the router"
        self.app = app
        self.route = route
        self.path = route.path
        self.methods = frozenset(route.methods)
        handlers = app.exception_handlers
        # as Starlette.build_middleware_stack splits them: 500 (or Exception) for
        # ServerErrorMiddleware, status codes and classes for ExceptionMiddleware
        self.server_error = handlers.get(500) or handlers[Exception]
        self.status_handlers = {k: v for k, v in handlers.items()
                                if isinstance(k, int) and k != 500}
        self.class_handlers = {k: v for k, v in handlers.items()
                               if not isinstance(k, int) and k is not Exception}

    def matches(self, scope: Scope) -> bool:
        """Whether the router would hand the request to this route: its path exactly (no
        root_path to take off first) and one of its methods."""
        return (scope["path"] == self.path and scope["method"] in self.methods
                and not scope.get("root_path"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        scope["app"] = app
        scope.setdefault("router", app.router)
        scope["route"] = self.route
        scope["endpoint"] = self.route.endpoint
        scope["path_params"] = dict(scope.get("path_params", {}))
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.route.app(scope, receive, sender)  # route.handle less its method check
        except Exception as exc:
            try:  # ExceptionMiddleware: the handler of the status code or class, if any
                handler = self._handler(exc)
                if handler is None:
                    raise
                if started:
                    raise RuntimeError("Caught handled exception, but response already "
                                       "started.") from exc
                response = await handler(Request(scope, receive, send), exc)
                if response is not None:
                    await response(scope, receive, sender)
                exc.__traceback__ = None
            except Exception as error:  # ServerErrorMiddleware: the 500 answer, raised on
                answer = await self.server_error(Request(scope), error)
                if not started:
                    await answer(scope, receive, send)
                raise error  # noqa: B904 - raised as it is, as Starlette raises it

    def _handler(self, exc: Exception) -> Any:
        """The app's handler for `exc`, looked up as ExceptionMiddleware looks it up."""
        if isinstance(exc, HTTPException) and exc.status_code in self.status_handlers:
            return self.status_handlers[exc.status_code]
        return next((self.class_handlers[cls] for cls in type(exc).__mro__
                     if cls in self.class_handlers), None)


class Guard:
    """Authenticates the listener, rate-limits the JSON API, caps request bodies, counts,
    times and traces every request. `direct`, if given, is a route it calls itself."""

    # the admin routes (/-/reload takes the admin token too: guessing it there was not
    # throttled) and the JSON API
    RATE_LIMITED_PREFIX = ("/api/", "/-/")
    IDENTIFIED_PREFIXES = ("/api/", "/-/")
    # on every answer of those: answers carry secrets (a new API key, a TOTP secret, a
    # session id) that no cache may keep, and JSON is never to be sniffed as HTML
    PRIVATE_HEADERS = [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]

    def __init__(self, app: ASGIApp, exporter: Exporter, auth: ListenerAuth,
                 direct: DirectRoute | None = None):
        self.app = app
        self.direct = direct
        self.exporter = exporter
        self.auth = auth
        self.limits = api_limits(exporter.config.data)
        self.limiter = RateLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        method = scope["method"]
        parent = tracing.extract(scope["headers"])
        with tracing.observe("http", "other", method if method in HTTP_METHODS else "HTTP",
                             SpanKind.SERVER, parent=parent) as operation:
            try:
                await self._guarded(scope, receive, send_wrapper)
            except BodyTooLarge:
                if not started:
                    await send_json(send_wrapper, 413, self._too_large())
            finally:
                route = scope.get("route")
                if route is None and status != 404:  # answered here, before routing
                    route = self._route_of(scope)
                handler = getattr(route, "path", "other") if route is not None else "other"
                self.exporter.http_requests.inc((handler, str(status)))
                operation.operation = handler
                if status >= 500:
                    operation.fail(str(status))
                if operation.span is not None:
                    _response_attributes(operation, scope, handler, status)

    def _route_of(self, scope: Scope) -> Any:
        """The route the router would have handed a request that the guard answered itself
        (401, 413, 429, a 503 while an API key was looked up), so that its latency and
        errors count under that route, not `other`; None when none would (a 404)."""
        routes = getattr(self.app, "routes", ())
        for wanted in (Match.FULL, Match.PARTIAL):  # PARTIAL: the path, not the method
            for route in routes:
                if route.matches(scope)[0] == wanted:
                    return route
        return None

    def _too_large(self) -> dict[str, Any]:
        limit = self.exporter.config["server"]["max_request_body_bytes"]
        return {"error": "payload_too_large", "message": f"request body over {limit} bytes"}

    async def _identify(self, scope: Scope) -> Identity | None:
        """Who calls an admin or /api/ route, worked out once and kept in the request state
        (app.py's authorize reads it there)."""
        path = scope["path"]
        if path in SELF_AUTHENTICATED or not path.startswith(self.IDENTIFIED_PREFIXES):
            return None
        authorization = header(scope, b"authorization")
        if not authorization:
            return None
        services = self.exporter.identity
        identity = await identify(self.auth, services.apikeys if services else None,
                                  authorization)
        scope.setdefault("state", {})["identity"] = identity
        return identity

    def _rate_limit(self, scope: Scope, identity: Identity | None) -> tuple[dict[str, str], bool]:
        """RateLimit headers for an /api/ request, and whether it may proceed.

        Clients holding the admin token are 'authenticated' (keyed by the token), a valid
        API key has its own per-key limit (counted by the key check), everyone else is
        'anonymous' (keyed by client address), so guessing tokens is throttled as hard
        as any anonymous traffic.
        """
        path = scope["path"]
        if self.limits is None or not path.startswith(self.RATE_LIMITED_PREFIX) or (
                path in SELF_AUTHENTICATED):
            return {}, True
        check = identity.check if identity is not None else None
        decision = check.limit if check is not None else None  # worked out at each reading
        if decision is not None:
            if not decision.allowed:
                self.exporter.rate_limited.inc(("apikey",))
            return headers(decision), decision.allowed
        if identity is not None and identity.kind == "admin":
            if not path.startswith("/api/"):  # /-/reload: only the guessing is throttled
                return {}, True
            klass, key = "authenticated", "admin"
        else:
            klass, key = "anonymous", (scope.get("client") or ("?", 0))[0]
        result = self.limiter.hit(klass, key, self.limits[klass])
        if not result.allowed:
            self.exporter.rate_limited.inc((klass,))
        return headers(result), result.allowed

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = self.auth
        try:
            identity = await self._identify(scope)  # an API key is looked up in the store
        except Exception as exc:
            if not is_outage(exc):
                raise
            count_store_outage(self.exporter, type(exc).__name__)
            await send_json(send, 503, STORE_UNAVAILABLE, STORE_RETRY_AFTER)
            return
        limit_headers, allowed = self._rate_limit(scope, identity)
        if scope["path"].startswith(self.IDENTIFIED_PREFIXES) and (
                scope["path"] not in SELF_AUTHENTICATED):
            encoded = [(k.lower().encode(), v.encode()) for k, v in limit_headers.items()]
            encoded += self.PRIVATE_HEADERS
            if not allowed:
                await send_json(send, 429, {"error": "rate_limited",
                                            "message": "too many requests; see Retry-After"},
                                encoded)
                return
            send = _with_headers(send, encoded)
        # an admin token or valid API key passes the listener's auth on the routes it serves
        passes = identity is not None and (identity.kind == "admin" or identity.valid_key)
        if auth.needs_auth(scope["path"]) and not passes and not await auth.allows(
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

        direct = self.direct
        if direct is not None and direct.matches(scope):
            await direct(scope, limited_receive, send)
        else:
            await self.app(scope, limited_receive, send)


# the methods the HTTP semantic conventions know (RFC 9110 and PATCH); any other is _OTHER
HTTP_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST",
                          "PUT", "TRACE"})
# (method, scheme, port, HTTP version, status, route, path) -> the server span's name (None:
# unrouted, the method stays) and attributes: one shared mapping per kind of answer, so a
# request neither builds the dict nor copies it, and the OTLP encoder writes its bytes once.
_ServerSpanKey = tuple[str, str, int, str, int, str, str]
_SERVER_SPANS: dict[_ServerSpanKey, tuple[str | None, dict[str, Any]]] = {}
MAX_SERVER_SPANS = 1024  # kinds kept; more (a mount's client-chosen paths) are built anew


def _response_attributes(operation: tracing.Span | tracing.Timed, scope: Scope,
                         handler: str, status: int) -> None:
    """The HTTP server span's attributes (semantic conventions), set once it answered.
    A path with a parameter (an account name, a metric name) is reported as its route
    template, an unrouted one (anything a client sent) not at all; the query string
    never."""
    server = scope.get("server") or ("", 0)
    path = "" if handler == "other" else handler if "{" in handler else scope["path"]
    key = (scope["method"], scope.get("scheme", "http"), server[1] or 0,
           scope.get("http_version", "1.1"), status, handler, path)
    entry = _SERVER_SPANS.get(key)
    if entry is None:
        entry = _server_span(*key)
        if len(_SERVER_SPANS) < MAX_SERVER_SPANS:
            _SERVER_SPANS[key] = entry
    name, attributes = entry
    if name is not None:
        operation.rename(name)
    operation.update(attributes)


def _server_span(method: str, scheme: str, port: int, version: str, status: int,
                 handler: str, path: str) -> tuple[str | None, dict[str, Any]]:
    """A kind of answer's span name and attributes, built once and then shared. A method
    outside HTTP_METHODS is `_OTHER` (its own word in http.request.method_original) and
    the name says HTTP, as the semantic conventions have it."""
    known = method in HTTP_METHODS
    attributes: dict[str, Any] = {"http.request.method": method if known else "_OTHER",
                                  "url.scheme": scheme, "server.port": port,
                                  "network.protocol.version": version,
                                  "http.response.status_code": status}
    if not known:
        attributes["http.request.method_original"] = method
    if handler == "other":
        return None, attributes
    attributes["http.route"] = handler
    attributes["url.path"] = path
    return f"{method if known else 'HTTP'} {handler}", attributes


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)
    return wrapped
