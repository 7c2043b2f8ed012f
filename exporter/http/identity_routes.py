"""JSON API of the identity services: API keys, sessions, CSRF, passwords (OIDC and SAML
in federation_routes.py). Thin endpoints: validate the body, call one library method,
format. Every route sits behind `scoped` with the scope of IDENTITY_SCOPES."""

from __future__ import annotations

from typing import Any

import jsonschema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exporter.http.security_routes import (
    Authorize,
    BadRequest,
    Endpoint,
    _error,
    _json_body,
    actor,
    scoped,
)
from exporter.service import Exporter
from security.apikeys import SCOPES
from security.sessions import Session

USER = {"type": "string", "minLength": 1, "maxLength": 320}
SESSION_ID = {"type": "string", "minLength": 1, "maxLength": 128}
APIKEY_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["name", "scopes"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "scopes": {"type": "array", "minItems": 1, "maxItems": len(SCOPES), "uniqueItems": True,
                   "items": {"type": "string", "enum": list(SCOPES)},
                   "description": "admin implies every other scope"},
        "expires_in": {"type": "integer", "minimum": 1,
                       "description": "Seconds; default security.api_keys.default_lifetime "
                                      "(365d)"},
        "rate_limit_per_minute": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    },
}
ROTATE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "grace_seconds": {"type": "integer", "minimum": 0, "maximum": 30 * 86400, "default": 0,
                          "description": "How long the old key keeps working"},
        "expires_in": {"type": "integer", "minimum": 1},
    },
}
SESSION_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["user"],
    "properties": {"user": USER,
                   "privilege": {"type": "string", "minLength": 1, "maxLength": 64,
                                 "default": "user"}},
}
PRIVILEGE_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"privilege": SESSION_SCHEMA["properties"]["privilege"]},
}
CSRF_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["session_id", "token"],
    "properties": {"session_id": SESSION_ID, "token": {"type": "string", "maxLength": 256}},
}
PASSWORD_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["password"],
    "properties": {
        "password": {"type": "string", "maxLength": 4096},
        "user": USER,
        "context": {"type": "array", "maxItems": 50,
                    "items": {"type": "string", "maxLength": 200},
                    "description": "More words the password may not contain"},
    },
}
HISTORY_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["user", "password"],
    "properties": {"user": USER, "password": {"type": "string", "minLength": 1,
                                              "maxLength": 4096}},
}
IDENTITY_SCOPES = {
    "apikeys": "admin",
    "sessions.read": "security:read",
    "sessions.write": "security:write",
    "csrf": "security:read",
    "passwords.check": "security:read",
    "passwords.history": "security:write",
}
_validators = {id(s): jsonschema.Draft7Validator(s) for s in (
    APIKEY_SCHEMA, ROTATE_SCHEMA, SESSION_SCHEMA, PRIVILEGE_SCHEMA, CSRF_SCHEMA,
    PASSWORD_SCHEMA, HISTORY_SCHEMA)}


async def body(request: Request, schema: dict[str, Any]) -> dict[str, Any]:
    """The JSON body checked against `schema` (an empty body is {} for optional bodies)."""
    if not schema.get("required") and not await request.body():
        return {}
    return await _json_body(request, _validators[id(schema)])


def identity_routes(exporter: Exporter, authorize: Authorize) -> list[Route]:
    """The routes, or none when security.enabled is false."""
    services = exporter.identity
    if services is None:
        return []

    def guard(handler: Endpoint, scope: str) -> Endpoint:
        return scoped(authorize, handler, IDENTITY_SCOPES[scope])

    # --- API keys

    async def create_key(request: Request) -> Response:
        b = await body(request, APIKEY_SCHEMA)
        try:
            key, token = await services.apikeys.create(
                b["name"], b["scopes"], b.get("expires_in"), actor=actor(request),
                rate_limit_per_minute=b.get("rate_limit_per_minute"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return JSONResponse({**key.as_dict(services.apikeys.clock()), "key": token},
                            status_code=201)

    async def list_keys(request: Request) -> Response:
        now = services.apikeys.clock()
        return JSONResponse({"keys": [k.as_dict(now) for k in await services.apikeys.list()]})

    async def get_key(request: Request) -> Response:
        key = await services.apikeys.get(request.path_params["id"])
        if key is None:
            return _error(404, "not_found", "no such API key")
        return JSONResponse(key.as_dict(services.apikeys.clock()))

    async def revoke_key(request: Request) -> Response:
        key = await services.apikeys.revoke(request.path_params["id"], actor=actor(request))
        if key is None:
            return _error(404, "not_found", "no such API key")
        return JSONResponse({"revoked": key.as_dict(services.apikeys.clock())})

    async def rotate_key(request: Request) -> Response:
        b = await body(request, ROTATE_SCHEMA)
        try:
            rotated = await services.apikeys.rotate(
                request.path_params["id"], actor=actor(request),
                grace=b.get("grace_seconds", 0), expires_in=b.get("expires_in"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if rotated is None:
            return _error(404, "not_found", "no such active API key")
        new, token, old = rotated
        now = services.apikeys.clock()
        return JSONResponse({**new.as_dict(now), "key": token, "replaces": old.as_dict(now)},
                            status_code=201)

    # --- sessions and CSRF

    def session_answer(session: Session, session_id: str) -> dict[str, Any]:
        return {"session_id": session_id, "csrf_token": services.csrf.issue(session_id),
                "cookie": services.sessions.cookie(session_id, session), **session.as_dict()}

    async def create_session(request: Request) -> Response:
        b = await body(request, SESSION_SCHEMA)
        session, session_id = await services.sessions.create(
            b["user"], b.get("privilege", "user"), actor=actor(request))
        return JSONResponse(session_answer(session, session_id), status_code=201)

    async def get_session(request: Request) -> Response:
        sessions, session_id = services.sessions, request.path_params["id"]
        session = (sessions.check(session_id) if sessions.held  # records held in memory
                   else await sessions.validate(session_id))
        if session is None:
            return _error(404, "not_found", "no such session (unknown, ended or expired)")
        return JSONResponse(session.as_dict())

    async def delete_session(request: Request) -> Response:
        session = await services.sessions.revoke(request.path_params["id"],
                                                 actor=actor(request))
        if session is None:
            return _error(404, "not_found", "no such session (unknown, ended or expired)")
        return JSONResponse({"revoked": True, "cookie": services.sessions.clear_cookie()})

    async def delete_user_sessions(request: Request) -> Response:
        user = request.query_params.get("user", "")
        if not user:
            raise BadRequest("user: required (?user=NAME)")
        count = await services.sessions.revoke_user(user, actor=actor(request))
        return JSONResponse({"revoked": count})

    async def refresh_session(request: Request) -> Response:
        sessions, session_id = services.sessions, request.path_params["id"]
        session = (sessions.check(session_id) if sessions.held  # records held in memory
                   else await sessions.validate(session_id))
        if session is None:
            return _error(404, "not_found", "no such session (unknown, ended or expired)")
        return JSONResponse(session_answer(session, session_id))

    async def rotate_session(request: Request) -> Response:
        b = await body(request, PRIVILEGE_SCHEMA)
        rotated = await services.sessions.rotate(request.path_params["id"], b.get("privilege"),
                                                 actor=actor(request))
        if rotated is None:
            return _error(404, "not_found", "no such session (unknown, ended or expired)")
        session, session_id = rotated
        return JSONResponse(session_answer(session, session_id))

    async def verify_csrf(request: Request) -> Response:
        b = await body(request, CSRF_SCHEMA)
        if not exporter.config["security"]["enable_csrf_protection"]:
            # the operator turned the requirement off: every request may proceed
            return JSONResponse({"valid": True, "required": False})
        sessions, session_id = services.sessions, b["session_id"]
        alive = (sessions.check(session_id, touch=False) if sessions.held
                 else await sessions.validate(session_id, touch=False)) is not None
        return JSONResponse({"valid": services.csrf.check(session_id, b["token"], alive),
                             "required": True})

    # --- passwords

    async def check_password(request: Request) -> Response:
        b = await body(request, PASSWORD_SCHEMA)
        result = await services.passwords.check(b["password"], b.get("user"),
                                                b.get("context", []), actor=actor(request))
        return JSONResponse(result.as_dict())

    async def remember_password(request: Request) -> Response:
        b = await body(request, HISTORY_SCHEMA)
        length = await services.passwords.remember(b["user"], b["password"],
                                                   actor=actor(request))
        return JSONResponse({"recorded": True, "history_length": length}, status_code=201)

    async def forget_passwords(request: Request) -> Response:
        removed = await services.passwords.forget(request.path_params["user"],
                                                  actor=actor(request))
        if not removed:
            return _error(404, "not_found", "no password history for this user")
        return JSONResponse({"deleted": True})

    v1 = "/api/v1"
    return [
        Route(f"{v1}/apikeys", guard(create_key, "apikeys"), methods=["POST"]),
        Route(f"{v1}/apikeys", guard(list_keys, "apikeys"), methods=["GET"]),
        Route(f"{v1}/apikeys/{{id}}", guard(get_key, "apikeys"), methods=["GET"]),
        Route(f"{v1}/apikeys/{{id}}", guard(revoke_key, "apikeys"), methods=["DELETE"]),
        Route(f"{v1}/apikeys/{{id}}/rotate", guard(rotate_key, "apikeys"), methods=["POST"]),
        Route(f"{v1}/sessions", guard(create_session, "sessions.write"), methods=["POST"]),
        Route(f"{v1}/sessions", guard(delete_user_sessions, "sessions.write"),
              methods=["DELETE"]),
        Route(f"{v1}/sessions/{{id}}", guard(get_session, "sessions.read"), methods=["GET"]),
        Route(f"{v1}/sessions/{{id}}", guard(delete_session, "sessions.write"),
              methods=["DELETE"]),
        Route(f"{v1}/sessions/{{id}}/refresh", guard(refresh_session, "sessions.write"),
              methods=["POST"]),
        Route(f"{v1}/sessions/{{id}}/rotate", guard(rotate_session, "sessions.write"),
              methods=["POST"]),
        Route(f"{v1}/csrf/verify", guard(verify_csrf, "csrf"), methods=["POST"]),
        Route(f"{v1}/passwords/check", guard(check_password, "passwords.check"),
              methods=["POST"]),
        Route(f"{v1}/passwords/history", guard(remember_password, "passwords.history"),
              methods=["POST"]),
        Route(f"{v1}/passwords/history/{{user}}", guard(forget_passwords, "passwords.history"),
              methods=["DELETE"]),
    ]


def identity_paths(security: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The OpenAPI description of the routes above (openapi.py merges it)."""
    from exporter.http.openapi import _json, scoped_operation

    def op(summary: str, scope: str, responses: dict[str, Any], *codes: int,
           **extra: Any) -> dict[str, Any]:
        return scoped_operation(security, summary, IDENTITY_SCOPES[scope], responses, *codes,
                                **extra)

    key: dict[str, Any] = {"type": "object", "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "prefix": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}},
        "created": {"type": "number"}, "expires": {"type": "number"},
        "revoked": {"type": ["number", "null"]}, "last_used": {"type": ["number", "null"]},
        "rate_limit_per_minute": {"type": "integer"}, "created_by": {"type": "string"},
        "state": {"type": "string", "enum": ["active", "expired", "revoked"]}}}
    new_key = {**key, "properties": {**key["properties"], "key": {
        "type": "string", "description": "The secret, shown this once: a3m_<id>_<secret>"}}}
    session: dict[str, Any] = {"type": "object", "properties": {
        "user": {"type": "string"}, "privilege": {"type": "string"},
        "created": {"type": "number"}, "expires_at": {"type": "number"},
        "idle_expires_at": {"type": "number"}, "absolute_expires_at": {"type": "number"}}}
    new_session = {"type": "object",
                   "required": ["session_id", "csrf_token", "expires_at", "cookie"],
                   "properties": {**session["properties"], "session_id": {"type": "string"},
                                  "csrf_token": {"type": "string"},
                                  "cookie": {"type": "string",
                                             "description": "A Set-Cookie header value"}}}
    check = {"type": "object", "required": ["accepted", "reasons", "score"], "properties": {
        "accepted": {"type": "boolean"},
        "reasons": {"type": "array", "items": {"type": "string", "enum": [
            "too_short", "too_long", "blocklisted", "context", "too_weak", "reused",
            "missing_uppercase", "missing_lowercase", "missing_digit", "missing_special"]}},
        "messages": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "integer", "minimum": 0, "maximum": 4},
        "guesses_log10": {"type": "number"},
        "suggestions": {"type": "array", "items": {"type": "string"}}}}
    return {
        "/api/v1/apikeys": {
            "post": op("Create an API key (the secret is in this answer only)", "apikeys",
                       {"201": _json("Created", new_key)}, 400, body=APIKEY_SCHEMA),
            "get": op("List API keys (never their secrets)", "apikeys",
                      {"200": _json("Keys", {"type": "object", "properties": {
                          "keys": {"type": "array", "items": key}}})}),
        },
        "/api/v1/apikeys/{id}": {
            "get": op("One API key", "apikeys", {"200": _json("Key", key)}, 404,
                      params=("id",)),
            "delete": op("Revoke an API key (at once)", "apikeys",
                         {"200": _json("Revoked")}, 404, params=("id",)),
        },
        "/api/v1/apikeys/{id}/rotate": {"post": op(
            "Replace a key by a new one with the same name, scopes and rate limit", "apikeys",
            {"201": _json("The new key, and the old one (revoked after grace_seconds)",
                          new_key)}, 400, 404, body=ROTATE_SCHEMA, params=("id",))},
        "/api/v1/sessions": {
            "post": op("Create a session", "sessions.write",
                       {"201": _json("Session", new_session)}, 400, body=SESSION_SCHEMA,
                       description="Beyond max_sessions_per_user the user's oldest session "
                                   "ends."),
            "delete": op("End every session of a user (?user=NAME)", "sessions.write",
                         {"200": _json("How many ended")}, 400),
        },
        "/api/v1/sessions/{id}": {
            "get": op("Validate a session (restarts its idle timer)", "sessions.read",
                      {"200": _json("Session", session)}, 404, params=("id",)),
            "delete": op("End a session", "sessions.write",
                         {"200": _json("Ended; cookie clears the browser's")}, 404,
                         params=("id",)),
        },
        "/api/v1/sessions/{id}/refresh": {"post": op(
            "Restart the idle timer; a fresh CSRF token and cookie", "sessions.write",
            {"200": _json("Session", new_session)}, 404, params=("id",))},
        "/api/v1/sessions/{id}/rotate": {"post": op(
            "New session id (on a privilege change); the old id ends at once",
            "sessions.write", {"200": _json("Session", new_session)}, 400, 404,
            body=PRIVILEGE_SCHEMA, params=("id",))},
        "/api/v1/csrf/verify": {"post": op(
            "Verify a CSRF token for a live session", "csrf",
            {"200": _json("Verdict", {"type": "object", "required": ["valid", "required"],
                                      "properties": {"valid": {"type": "boolean"},
                                                     "required": {"type": "boolean"}}})},
            400, body=CSRF_SCHEMA)},
        "/api/v1/passwords/check": {"post": op(
            "Check a password against the policy (NIST SP 800-63B)", "passwords.check",
            {"200": _json("Verdict", check)}, 400, body=PASSWORD_SCHEMA)},
        "/api/v1/passwords/history": {"post": op(
            "Remember a user's new password (Argon2id) so it cannot be reused",
            "passwords.history", {"201": _json("Recorded")}, 400, body=HISTORY_SCHEMA)},
        "/api/v1/passwords/history/{user}": {"delete": op(
            "Forget a user's password history", "passwords.history",
            {"200": _json("Deleted")}, 404, params=("user",))},
    }
