"""HTTP front ends of the security engine: the Dovecot policy endpoint and the JSON API.

Thin endpoints: parse (protocol code lives in security/protocols/), call one
engine method, format. The admin API needs the admin bearer token or an API key with
the route's scope: security:read to read, security:write to change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import jsonschema
from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from exporter.config import read_secret
from exporter.http.middleware import header
from exporter.instruments import CounterVec
from exporter.service import Exporter
from security import strict_json
from security.attempts import Attempt
from security.audit import MAX_QUERY_LIMIT
from security.blocklist import export_text, import_text
from security.engine import SecurityManager
from security.protocols import dovecot, stalwart
from security.store import Record, is_outage

Endpoint = Callable[[Request], Awaitable[Response]]
Authorize = Callable[[Request, str], Awaitable[Response | None]]
"""app.py's check of a route's scope: None when allowed, else the 401/403/429 answer."""

ATTEMPT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["login", "remote_ip"],
    "properties": {
        "login": {"type": "string", "minLength": 1, "maxLength": 1024},
        "remote_ip": {"type": "string", "maxLength": 64},
        "protocol": {"type": "string", "maxLength": 32, "default": "unknown"},
        "tls": {"type": "boolean", "default": False},
        "session_id": {"type": "string", "maxLength": 256, "default": ""},
        "device_id": {"type": "string", "maxLength": 256, "default": "",
                      "description": "A stable id of the client device (e.g. a long-lived "
                                     "cookie of the web front end): an unknown one makes "
                                     "users with a second factor answer mfa_required."},
        "pwhash": {"type": "string", "maxLength": 256, "default": "",
                   "description": "A hash that tells distinct passwords apart; never the "
                                  "password."},
        "success": {"type": "boolean", "description": "Required by report."},
    },
}
BAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["network"],
    "properties": {
        "network": {"type": "string", "maxLength": 64, "description": "IP address or CIDR"},
        "reason": {"type": "string", "maxLength": 500, "default": ""},
        "duration_seconds": {"type": ["number", "null"], "exclusiveMinimum": 0,
                             "description": "Omitted or null: until unbanned."},
    },
}
_attempt_validator = jsonschema.Draft7Validator(ATTEMPT_SCHEMA)
_ban_validator = jsonschema.Draft7Validator(BAN_SCHEMA)


class BadRequest(Exception):
    """A request refused with 400; `error` is the body's first schema error, if that was it."""

    def __init__(self, message: str, error: jsonschema.ValidationError | None = None):
        super().__init__(message)
        self.error = error


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


FEED_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a blocklist import's ?feed= name
_LOOPBACK: dict[str, bool] = {}  # client host -> is loopback; a policy client has few hosts


def _is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    host = client[0] if client else ""
    known = _LOOPBACK.get(host)
    if known is None:
        try:
            known = ipaddress.ip_address(host).is_loopback
        except ValueError:
            known = False
        if len(_LOOPBACK) >= 1024:
            _LOOPBACK.clear()
        _LOOPBACK[host] = known
    return known


class SecretCache:
    """One secret (`<name>_file` or `<name>_env`, as read_secret reads it), kept between
    requests: reading the file costs more than a whole policy decision. It is read again
    when the config names another file or variable, when the file (its mtime, size or
    inode) or the variable changes, looked at no more than every `recheck` seconds, and
    at once after clear() (on every config reload)."""

    def __init__(self, name: str, recheck: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._keys = (f"{name}_file", f"{name}_env")  # looked up on every request
        self.recheck = recheck
        self.clock = clock
        self.clear()

    def clear(self) -> None:
        self._source: tuple[str, str] | None = None
        self._stamp: object = None
        self._value: str | None = None
        self._next_check = 0.0

    def get(self, section: Mapping[str, Any]) -> str | None:
        """The secret, or None if neither is configured; OSError if the file is unreadable."""
        file_key, env_key = self._keys
        source = (section.get(file_key) or "", section.get(env_key) or "")
        now = self.clock()
        if source == self._source and now < self._next_check:
            return self._value
        path, env = source
        stamp = _file_stamp(path) if path else os.environ.get(env) if env else None
        if source != self._source or stamp != self._stamp:
            self._value = read_secret(section, self.name)  # raises before anything is cached
            self._source, self._stamp = source, stamp
        self._next_check = now + self.recheck
        return self._value


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character \\u-escaped, for text stored before it was
    checked."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def _time_param(query: QueryParams, name: str) -> float | None:
    """A Unix time query parameter (seconds, a fraction allowed), or None when absent."""
    if name not in query:
        return None
    try:
        value = float(query[name])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequest(f"{name}: expected a Unix time in seconds, got {query[name]!r}")
    return value


_JSON_TYPES = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "true or false",
               "object": "an object", "array": "an array", "null": "null"}


def schema_problem(error: jsonschema.ValidationError) -> str:
    """`field: what is wrong`, from the schema alone: jsonschema's own message quotes the
    value, which may be a password or a token (and as long as the body allows)."""
    where = ".".join(str(p) for p in error.absolute_path) or "(body)"
    rule, limit = str(error.validator), cast(Any, error.validator_value)
    if rule == "type":
        kinds = [limit] if isinstance(limit, str) else list(limit)
        return f"{where}: expected {' or '.join(_JSON_TYPES.get(k, k) for k in kinds)}"
    messages = {
        "maxLength": f"longer than {limit} characters", "minLength":
            f"shorter than {limit} characters" if limit != 1 else "must not be empty",
        "pattern": "not in the expected form", "maxItems": f"more than {limit} items",
        "minItems": f"fewer than {limit} items", "uniqueItems": "items must be unique",
        "minimum": f"must be >= {limit}", "maximum": f"must be <= {limit}",
        "exclusiveMinimum": f"must be > {limit}", "exclusiveMaximum": f"must be < {limit}",
        "format": f"not a valid {limit}", "const": f"must be {limit!r}",
        "enum": "must be one of " + ", ".join(repr(v) for v in limit)
        if isinstance(limit, list) else "not an allowed value",
    }
    if rule in messages:
        return f"{where}: {messages[rule]}"
    if rule in ("required", "additionalProperties", "dependencies", "dependentRequired"):
        return f"{where}: {error.message}"  # names properties the client sent or must send
    return f"{where}: not valid ({rule})"


async def _json_body(request: Request, validator: jsonschema.Draft7Validator) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = strict_json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is one
        raise BadRequest(f"body must be UTF-8 JSON: {exc}") from None
    try:
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    except RecursionError:
        raise BadRequest("body must be UTF-8 JSON: nested too deeply") from None
    if errors:
        raise BadRequest(schema_problem(errors[0]), errors[0])
    result: dict[str, Any] = body
    return result


# The two query strings Dovecot sends, looked up before Starlette parses them.
_POLICY_COMMANDS = {b"command=allow": "allow", b"command=report": "report"}


class DovecotPolicy:
    """POST /dovecot/policy, as a plain ASGI app rather than an endpoint function.

    Dovecot calls it twice per login; Starlette's Request/Response wrapping of an
    endpoint function costs about as much as the decision itself (see
    benchmarks/BENCHMARKS.md). Parsing is in security/protocols/dovecot.py as for any
    endpoint; the errors are the same JSON responses, and exceptions (a body over the
    limit included) reach the app's exception handlers as before.
    """

    def __init__(self, exporter: Exporter, engine: SecurityManager, frontends: CounterVec,
                 api_key: SecretCache) -> None:
        self.exporter = exporter
        self.engine = engine
        self.frontends = frontends
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self._answer(scope, receive)
        if isinstance(response, bytes):
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-length", str(len(response)).encode("latin-1")),
                (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": response})
        else:
            await response(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive) -> bytes | Response:
        """The answer's JSON body, or an error response."""
        settings = self.exporter.config["security"]["dovecot_policy"]
        if not settings["enabled"]:
            return _error(404, "not_found", "the Dovecot policy endpoint is disabled")
        key = self.api_key.get(settings)
        sent = header(scope, settings["api_key_header"].lower().encode("latin-1"))
        if sent is not None:  # a key sent is checked, from loopback too (even an empty one)
            allowed = key is not None and hmac.compare_digest(sent.encode(), key.encode())
        else:
            allowed = settings["allow_loopback_without_key"] and _is_loopback(scope)
        if not allowed:
            self.frontends.inc(("dovecot", "unauthorized"))
            return _error(401, "unauthorized", f"{settings['api_key_header']} required")
        query = scope.get("query_string", b"")
        command = _POLICY_COMMANDS.get(query) or QueryParams(query).get("command")
        try:
            command, attempt, fields = dovecot.parse_request(command, await _body(receive))
            if command == "allow":
                mfa = self.exporter.mfa
                mfa_reject = mfa is not None and mfa.settings.policy.dovecot_action == "reject"
                body = dovecot.answer_body(await self.engine.check(attempt), mfa_reject)
            else:
                # a login our own policy refused is not a wrong password
                if not fields.get("policy_reject"):
                    await self.engine.report(attempt, fields["success"])
                body = dovecot.OK_BODY
        except dovecot.PolicyRequestError as exc:
            self.frontends.inc(("dovecot", "bad_request"))
            return _error(400, "bad_request", str(exc))
        self.frontends.inc(("dovecot", "ok"))
        return body


async def _body(receive: Receive) -> bytes:
    """The request body, read as Starlette's Request.body() reads it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


def _decision_json(decision: Any) -> dict[str, Any]:
    return {"action": decision.action, "reason": decision.reason, "delay": decision.delay,
            "message": decision.message, "retry_after": round(decision.retry_after, 3)}


def scoped(authorize: Authorize, handler: Endpoint, scope: str | None = None) -> Endpoint:
    """`handler` behind the admin token or an API key holding `scope` (None: security:read
    for GET, security:write for other methods); BadRequest becomes a 400."""
    async def guarded(request: Request) -> Response:
        needed = scope or ("security:read" if request.method in ("GET", "HEAD")
                           else "security:write")
        denied = await authorize(request, needed)
        if denied is not None:
            return denied
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
    return guarded


def actor(request: Request) -> str:
    """The caller as the audit log names it: admin, or apikey:<id>."""
    identity = request.scope.get("state", {}).get("identity")
    return identity.actor if identity is not None else "admin"


POLICY_PATH = "/dovecot/policy"


def split_policy_route(routes: list[Route]) -> tuple[list[Route], list[Route]]:
    """(the Dovecot policy route, if any; the others), each in their order."""
    return ([r for r in routes if r.path == POLICY_PATH],
            [r for r in routes if r.path != POLICY_PATH])


def security_routes(exporter: Exporter, authorize: Authorize) -> list[Route]:
    """The routes, or none when security.enabled is false."""
    engine = exporter.security
    if engine is None:
        return []
    frontends = exporter.security_frontends
    api_key = SecretCache("api_key")
    webhook_secret = SecretCache("secret")

    def forget_secrets(_config: object) -> None:
        api_key.clear()
        webhook_secret.clear()

    exporter.on_reload.append(forget_secrets)

    def admin(handler: Endpoint) -> Endpoint:
        return scoped(authorize, handler)

    def _attempt(body: dict[str, Any]) -> Attempt:
        attempt = Attempt(login=body["login"], remote_ip=body["remote_ip"],
                          protocol=body.get("protocol", "unknown"), tls=body.get("tls", False),
                          session_id=body.get("session_id", ""), pwhash=body.get("pwhash", ""),
                          device_id=body.get("device_id", ""))
        try:
            ipaddress.ip_address(attempt.remote_ip)
        except ValueError:
            raise BadRequest(f"remote_ip: not an IP address: {attempt.remote_ip!r}") from None
        return attempt

    async def check(request: Request) -> Response:
        attempt = _attempt(await _json_body(request, _attempt_validator))
        return JSONResponse(_decision_json(await engine.check(attempt)))

    async def report(request: Request) -> Response:
        body = await _json_body(request, _attempt_validator)
        if "success" not in body:
            raise BadRequest("success: required")
        actions = await engine.report(_attempt(body), body["success"])
        return JSONResponse({"recorded": True, "actions": actions})

    async def lockouts(request: Request) -> Response:
        return JSONResponse({"lockouts": [lock.as_dict() for lock in await engine.lockouts()]})

    async def unlock(request: Request) -> Response:
        # in the path, or ?account= for a login with a "/" in it (a path parameter stops
        # at "/", and %2F is decoded before routing)
        account = request.path_params.get("account") or request.query_params.get("account")
        if not account:
            raise BadRequest("account: give it in the path or as ?account=")
        try:
            removed = await engine.unlock(account, request.query_params.get("source"),
                                          actor=actor(request))
        except ValueError as exc:
            raise BadRequest(f"source: {exc}") from None
        if not removed:
            return _error(404, "not_found", f"no lockout for {account!r}")
        return JSONResponse({"unlocked": [lock.as_dict() for lock in removed]})

    async def blocklist(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse({"bans": [dataclasses.asdict(b) for b in await engine.banned()]})
        if request.method == "DELETE":
            network = request.query_params.get("network", "")
            try:
                ban = await engine.unban(network, actor=actor(request))
            except ValueError as exc:
                raise BadRequest(f"network: {exc}") from None
            if ban is None:
                return _error(404, "not_found", f"{network!r} is not banned")
            return JSONResponse({"unbanned": dataclasses.asdict(ban)})
        body = await _json_body(request, _ban_validator)
        try:
            ban = await engine.ban(body["network"], body.get("reason", ""),
                                   body.get("duration_seconds"), actor=actor(request))
        except ValueError as exc:
            raise BadRequest(f"network: {exc}") from None
        return JSONResponse({"banned": dataclasses.asdict(ban)}, status_code=201)

    async def blocklist_text(request: Request) -> Response:
        if request.method == "GET":
            return PlainTextResponse(export_text(await engine.banned()))
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("body must be UTF-8 text") from None
        name = request.query_params.get("feed", "")
        if name and not FEED_NAME.fullmatch(name):  # exported as source=feed:NAME, one word
            raise BadRequest("feed must be letters, digits, '.', '_' or '-'")
        source = f"feed:{name}" if name else "manual"
        entries, errors = import_text(text, source, engine.clock())
        for entry in entries:
            duration = entry.expires - engine.clock() if entry.expires else None
            if duration is not None and duration <= 0:
                continue
            # a line's source= wins over the request's: an export imported again keeps them
            await engine.ban(entry.network, entry.reason, duration, source=entry.source,
                             actor=actor(request))
        return JSONResponse({"imported": len(entries),
                             "errors": [{"line": n, "message": m} for n, m in errors]})

    async def audit(request: Request) -> Response:
        if exporter.audit is None:
            return _error(404, "not_found", "the audit log is disabled")
        q = request.query_params
        start, end = _time_param(q, "start"), _time_param(q, "end")
        limit = q.get("limit", "100")
        if not limit.isdecimal() or len(limit) > 6 or not 1 <= int(limit) <= MAX_QUERY_LIMIT:
            raise BadRequest(f"limit: expected a whole number from 1 to {MAX_QUERY_LIMIT}, "
                             f"got {limit[:20]!r}")
        types = q.getlist("type") or None
        try:  # it reads the file: off the event loop, which keeps deciding logins
            records, cursor = await asyncio.to_thread(
                exporter.audit.query, start=start, end=end, types=types, actor=q.get("actor"),
                subject=q.get("subject"), limit=int(limit), cursor=q.get("cursor"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        # \u-escaped: a record written before strict_json refused lone surrogates may
        # hold one, which UTF-8 cannot encode (the log itself is ASCII)
        return AsciiJSONResponse({"records": records, "next_cursor": cursor})

    async def audit_verify(request: Request) -> Response:
        if exporter.audit is None:
            return _error(404, "not_found", "the audit log is disabled")
        result = await asyncio.to_thread(exporter.audit.verify)
        return JSONResponse({**dataclasses.asdict(result), "message": str(result)},
                            status_code=200 if result.ok else 409)

    replay = stalwart.ReplayGuard(exporter.config.seconds("security", "stalwart_webhook",
                                                          "replay_window"))

    async def stalwart_webhook(request: Request) -> Response:
        settings = exporter.config["security"]["stalwart_webhook"]
        if not settings["enabled"]:
            return _error(404, "not_found", "the Stalwart webhook is disabled")
        key = webhook_secret.get(settings)
        if key is None:
            frontends.inc(("stalwart", "unauthorized"))
            return _error(403, "forbidden", "no webhook secret configured "
                                            "(security.stalwart_webhook.secret_file)")
        body = await request.body()
        if not stalwart.signature_ok(key.encode(), body, request.headers.get("x-signature")):
            frontends.inc(("stalwart", "unauthorized"))
            return _error(401, "unauthorized", "bad or missing X-Signature")
        try:
            events = stalwart.parse_batch(body)
        except stalwart.WebhookError as exc:
            frontends.inc(("stalwart", "bad_request"))
            return _error(400, "bad_request", str(exc))
        replay.window = exporter.config.seconds("security", "stalwart_webhook", "replay_window")
        accepted = ignored = 0
        for event in events:
            attempt, address = event.login(), event.ban_address()
            if attempt is None and address is None:  # nothing for the engine: not taken
                ignored += 1
                continue
            now = engine.clock()
            if not replay.fresh(event, now):
                continue
            # the store remembers the id too, until the replay window closes on it: a
            # restart (or another replica) does not take a captured batch again
            try:
                first = await engine.store.add_record(Record(
                    stalwart.EVENT_KIND, event.id, {"at": now},
                    event.created + replay.window), now)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                replay.forget(event.id)  # not taken: the batch sent again must take it
                frontends.inc(("stalwart", "store_unavailable"))
                return _error(503, "store_unavailable", "the security store is unavailable; "
                              "send the batch again later")
            if not first:
                continue
            accepted += 1
            if attempt is not None:
                await engine.report(attempt, event.type == "auth.success")
            elif address is not None:
                await engine.ban(address, f"stalwart {event.type}",
                                 engine.settings.auto_ban_duration, source="feed:stalwart",
                                 actor="stalwart")
        frontends.inc(("stalwart", "ok"))
        return JSONResponse({"accepted": accepted, "ignored": ignored,
                             "skipped": len(events) - accepted - ignored})

    return [
        Route(POLICY_PATH, DovecotPolicy(exporter, engine, frontends, api_key),
              methods=["POST"]),
        Route("/api/v1/webhooks/stalwart", stalwart_webhook, methods=["POST"]),
        Route("/api/v1/security/check", admin(check), methods=["POST"]),
        Route("/api/v1/security/report", admin(report), methods=["POST"]),
        Route("/api/v1/security/lockouts", admin(lockouts), methods=["GET"]),
        Route("/api/v1/security/lockouts", admin(unlock), methods=["DELETE"]),
        Route("/api/v1/security/lockouts/{account}", admin(unlock), methods=["DELETE"]),
        Route("/api/v1/security/blocklist", admin(blocklist), methods=["GET", "POST", "DELETE"]),
        Route("/api/v1/security/blocklist.txt", admin(blocklist_text), methods=["GET", "POST"]),
        Route("/api/v1/security/audit", admin(audit), methods=["GET"]),
        Route("/api/v1/security/audit/verify", admin(audit_verify), methods=["GET"]),
    ]
