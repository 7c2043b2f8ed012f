"""The MFA routes under /api/v1/mfa/: thin endpoints over security.mfa.manager.MfaManager.

Every route sits behind the authorisation wrapper of the security routes (`scoped`)
with the scope `SCOPES` names for it: the web front end calls these with
the admin token or an API key holding that scope.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exporter.http.security_routes import (
    Authorize,
    BadRequest,
    _error,
    _json_body,
    actor,
    scoped,
)
from exporter.service import Exporter
from security.mfa.delivery import DeliveryError
from security.mfa.manager import LoginContext, MfaError, MfaManager, Verification

P = "/api/v1/mfa"
# The scope each route needs (an API key must hold it; the admin token holds them all).
SCOPES: dict[tuple[str, str], str] = {
    ("POST", f"{P}/totp/enroll"): "security:write",
    ("POST", f"{P}/totp/verify"): "security:write",
    ("POST", f"{P}/recovery/verify"): "security:write",
    ("POST", f"{P}/recovery/regenerate"): "security:write",
    ("POST", f"{P}/email/send"): "security:write",
    ("POST", f"{P}/email/verify"): "security:write",
    ("POST", f"{P}/sms/send"): "security:write",
    ("POST", f"{P}/sms/verify"): "security:write",
    ("POST", f"{P}/webauthn/register/options"): "security:write",
    ("POST", f"{P}/webauthn/register/verify"): "security:write",
    ("POST", f"{P}/webauthn/authenticate/options"): "security:write",
    ("POST", f"{P}/webauthn/authenticate/verify"): "security:write",
    ("GET", f"{P}/users"): "security:read",
    ("GET", f"{P}/users/{{user}}"): "security:read",
    ("DELETE", f"{P}/users/{{user}}"): "security:write",
    ("DELETE", f"{P}/users/{{user}}/totp"): "security:write",
    ("DELETE", f"{P}/users/{{user}}/webauthn/{{credential_id}}"): "security:write",
}
# What an MfaError or DeliveryError reason answers: HTTP status and error code.
STATUS: dict[str, tuple[int, str]] = {
    "not_enrolled": (404, "not_enrolled"),
    "channel_disabled": (404, "channel_disabled"),
    "rate_limited": (429, "rate_limited"),
    "no_challenge": (409, "no_challenge"),
    "already_registered": (409, "already_registered"),
    "invalid": (400, "registration_failed"),
    "format_not_allowed": (400, "registration_failed"),
    "bad_destination": (400, "bad_request"),
    "failed": (502, "delivery_failed"),
    "rejected": (502, "delivery_failed"),
    "circuit_open": (503, "provider_unavailable"),
    "sealed_secret": (500, "sealed_secret"),
}

# something besides spaces: "   " became the account "" (trimmed), as good as any
_USER = {"type": "string", "minLength": 1, "maxLength": 256,
         "pattern": "^[^\\x00-\\x1f\\x7f]*[^\\s\\x00-\\x1f\\x7f][^\\x00-\\x1f\\x7f]*$",
         "description": "The account (trimmed, compared in lower case)."}
_CODE = {"type": "string", "minLength": 1, "maxLength": 64}
_CONTEXT = {
    "remote_ip": {"type": "string", "maxLength": 64,
                  "description": "The client's address: on success its network is "
                                 "remembered (no mfa_required from it for remember_for)."},
    "device_id": {"type": "string", "minLength": 1, "maxLength": 256,
                  "description": "The client device's stable id: remembered on success."},
}
_CREDENTIAL = {"type": "object", "description": "The PublicKeyCredential as its toJSON() "
                                                "gives it (base64url fields)."}


def _schema(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": required,
            "properties": properties}


SCHEMAS: dict[str, dict[str, Any]] = {
    "user": _schema(["user"], user=_USER),
    "code": _schema(["user", "code"], user=_USER, code=_CODE, **_CONTEXT),
    "email": _schema(["user", "address"], user=_USER,
                     address={"type": "string", "minLength": 3, "maxLength": 254}),
    "sms": _schema(["user", "phone"], user=_USER,
                   phone={"type": "string", "minLength": 2, "maxLength": 16,
                          "description": "E.164, e.g. +4915112345678"}),
    "register_options": _schema(["user"], user=_USER,
                                display_name={"type": "string", "maxLength": 256}),
    "register": _schema(["user", "credential"], user=_USER, credential=_CREDENTIAL,
                        name={"type": "string", "maxLength": 100}),
    "authenticate": _schema(["user", "credential"], user=_USER, credential=_CREDENTIAL,
                            **_CONTEXT),
}
_validators = {name: jsonschema.Draft7Validator(schema) for name, schema in SCHEMAS.items()}


def _context(body: dict[str, Any], request: Request) -> LoginContext:
    ip = body.get("remote_ip", "")
    if ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise BadRequest(f"remote_ip: not an IP address: {ip!r}") from None
    return LoginContext(ip, body.get("device_id", ""), actor(request))


def _verification(result: Verification) -> Response:
    headers = {"retry-after": str(max(1, round(result.retry_after)))} if (
        result.retry_after) else None
    return JSONResponse(result.as_dict(), headers=headers)


def _refused(exc: MfaError | DeliveryError) -> Response:
    status, code = STATUS.get(exc.reason, (400, "bad_request"))
    response = _error(status, code, str(exc))
    retry = getattr(exc, "retry_after", 0.0)
    if retry:
        response.headers["retry-after"] = str(max(1, round(retry)))
    return response


def mfa_routes(exporter: Exporter, authorize: Authorize) -> list[Route]:
    """The routes, or none when security or security.mfa is disabled."""
    mfa: MfaManager | None = exporter.mfa
    if mfa is None:
        return []
    manager = mfa

    async def body(request: Request, schema: str) -> dict[str, Any]:
        return await _json_body(request, _validators[schema])

    async def totp_enroll(request: Request) -> Response:
        b = await body(request, "user")
        return JSONResponse(await manager.enroll_totp(b["user"], actor=actor(request)))

    async def totp_verify(request: Request) -> Response:
        b = await body(request, "code")
        return _verification(await manager.verify_totp(b["user"], b["code"], _context(b, request)))

    async def recovery_verify(request: Request) -> Response:
        b = await body(request, "code")
        return _verification(await manager.verify_recovery(b["user"], b["code"],
                                                           _context(b, request)))

    async def recovery_regenerate(request: Request) -> Response:
        b = await body(request, "user")
        return JSONResponse({"user": b["user"],
                             "recovery_codes": await manager.new_recovery_codes(
                                 b["user"], actor=actor(request))})

    def code_routes(channel: str, field: str) -> tuple[Callable[[Request], Awaitable[Response]],
                                                       Callable[[Request], Awaitable[Response]]]:
        async def send(request: Request) -> Response:
            b = await body(request, channel)
            answer = await manager.send_code(b["user"], channel, b[field],
                                             actor=actor(request))
            return JSONResponse(answer, status_code=202)

        async def verify(request: Request) -> Response:
            b = await body(request, "code")
            return _verification(await manager.verify_code(b["user"], channel, b["code"],
                                                           _context(b, request)))
        return send, verify

    email_send, email_verify = code_routes("email", "address")
    sms_send, sms_verify = code_routes("sms", "phone")

    async def register_options(request: Request) -> Response:
        b = await body(request, "register_options")
        return JSONResponse({"options": await manager.webauthn_register_options(
            b["user"], b.get("display_name", ""))})

    async def register_verify(request: Request) -> Response:
        b = await body(request, "register")
        credential = await manager.webauthn_register(b["user"], b["credential"],
                                                     b.get("name", ""), actor=actor(request))
        return JSONResponse(credential, status_code=201)

    async def authenticate_options(request: Request) -> Response:
        b = await body(request, "user")
        return JSONResponse({"options": await manager.webauthn_authenticate_options(
            b["user"])})

    async def authenticate_verify(request: Request) -> Response:
        b = await body(request, "authenticate")
        return _verification(await manager.webauthn_authenticate(b["user"], b["credential"],
                                                                 _context(b, request)))

    async def users(request: Request) -> Response:
        return JSONResponse({"users": await manager.users()})

    async def user(request: Request) -> Response:
        name = request.path_params["user"]
        if request.method == "GET":
            return JSONResponse(await manager.status(name))
        removed = await manager.reset(name, actor=actor(request))
        if not removed:
            return _error(404, "not_found", f"no MFA state for {name!r}")
        return JSONResponse({"reset": True, "fields_removed": removed})

    async def user_totp(request: Request) -> Response:
        name = request.path_params["user"]
        if not await manager.remove_totp(name, actor=actor(request)):
            return _error(404, "not_found", f"{name!r} has no TOTP")
        return JSONResponse({"removed": "totp"})

    async def user_credential(request: Request) -> Response:
        name, cid = request.path_params["user"], request.path_params["credential_id"]
        if not await manager.webauthn_remove(name, cid, actor=actor(request)):
            return _error(404, "not_found", f"{name!r} has no credential {cid!r}")
        return JSONResponse({"removed": cid})

    handlers: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
        ("POST", f"{P}/totp/enroll"): totp_enroll,
        ("POST", f"{P}/totp/verify"): totp_verify,
        ("POST", f"{P}/recovery/verify"): recovery_verify,
        ("POST", f"{P}/recovery/regenerate"): recovery_regenerate,
        ("POST", f"{P}/email/send"): email_send,
        ("POST", f"{P}/email/verify"): email_verify,
        ("POST", f"{P}/sms/send"): sms_send,
        ("POST", f"{P}/sms/verify"): sms_verify,
        ("POST", f"{P}/webauthn/register/options"): register_options,
        ("POST", f"{P}/webauthn/register/verify"): register_verify,
        ("POST", f"{P}/webauthn/authenticate/options"): authenticate_options,
        ("POST", f"{P}/webauthn/authenticate/verify"): authenticate_verify,
        ("GET", f"{P}/users"): users,
        ("GET", f"{P}/users/{{user}}"): user,
        ("DELETE", f"{P}/users/{{user}}"): user,
        ("DELETE", f"{P}/users/{{user}}/totp"): user_totp,
        ("DELETE", f"{P}/users/{{user}}/webauthn/{{credential_id}}"): user_credential,
    }

    def guarded(method: str, path: str) -> Callable[[Request], Awaitable[Response]]:
        handler = handlers[(method, path)]

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except (MfaError, DeliveryError) as exc:
                return _refused(exc)
        return scoped(authorize, answer, SCOPES[(method, path)])

    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for method, path in handlers:
        by_path.setdefault(path, {})[method] = guarded(method, path)
    return [Route(path, _dispatch(methods), methods=list(methods))
            for path, methods in by_path.items()]


def _dispatch(methods: dict[str, Callable[[Request], Awaitable[Response]]]
              ) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await methods[request.method](request)
    return endpoint


# --- /openapi.json


def mfa_paths(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    from exporter.http.openapi import _errors, _json

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": SCHEMAS[name]}}}

    verification = {"type": "object", "required": ["valid", "method", "reason"], "properties": {
        "valid": {"type": "boolean"}, "method": {"type": "string"},
        "reason": {"type": "string", "enum": [
            "ok", "invalid", "replayed", "expired", "no_code", "too_many_attempts",
            "rate_limited", "locked", "not_enrolled", "no_challenge", "cloned"]},
        "drift_steps": {"type": "integer", "description": "TOTP: steps the device's clock is "
                                                          "off (-1, 0, 1)"},
        "confirmed": {"type": "boolean"}, "remaining": {"type": "integer"},
        "attempts_left": {"type": "integer"}, "credential_id": {"type": "string"},
        "sign_count": {"type": "integer"}, "retry_after": {"type": "number"}}}
    user_path = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"}}
    verified = {"200": _json("Verification result (valid false with a reason when refused; "
                             "rate_limited and locked carry retry_after)", verification),
                **_errors(400, 401, 403, 413)}
    ops: dict[tuple[str, str], dict[str, Any]] = {
        ("POST", f"{P}/totp/enroll"): {
            "summary": "Enrol TOTP: a new secret (replacing any), otpauth:// URI, QR code, "
                       "recovery codes; confirmed by the first good code",
            "requestBody": body("user"),
            "responses": {"200": _json("Shown once: secret, provisioning_uri, qr_svg (SVG "
                                       "document), recovery_codes, digits, period, algorithm"),
                          **_errors(400, 401, 403)}},
        ("POST", f"{P}/totp/verify"): {
            "summary": "Verify a TOTP code (one step of skew; a used step is never accepted "
                       "again)", "requestBody": body("code"), "responses": verified},
        ("POST", f"{P}/recovery/verify"): {
            "summary": "Use a recovery code (single use)", "requestBody": body("code"),
            "responses": verified},
        ("POST", f"{P}/recovery/regenerate"): {
            "summary": "Replace the user's recovery codes", "requestBody": body("user"),
            "responses": {"200": _json("The new codes, shown once"),
                          **_errors(400, 401, 403, 404)}},
        ("POST", f"{P}/email/send"): {
            "summary": "Send a one-time code by e-mail (SMTP relay)",
            "requestBody": body("email"),
            "responses": {"202": _json("Sent: expires_in, max_attempts"),
                          **_errors(400, 401, 403, 404, 429, 502)}},
        ("POST", f"{P}/email/verify"): {
            "summary": "Verify an e-mailed code (expiring, attempt-limited, single use)",
            "requestBody": body("code"), "responses": verified},
        ("POST", f"{P}/sms/send"): {
            "summary": "Send a one-time code by SMS (provider webhook with retries and a "
                       "circuit breaker)", "requestBody": body("sms"),
            "responses": {"202": _json("Sent: expires_in, max_attempts"),
                          **_errors(400, 401, 403, 404, 429, 502, 503)}},
        ("POST", f"{P}/sms/verify"): {
            "summary": "Verify an SMS code", "requestBody": body("code"),
            "responses": verified},
        ("POST", f"{P}/webauthn/register/options"): {
            "summary": "WebAuthn registration options (for navigator.credentials.create)",
            "requestBody": body("register_options"),
            "responses": {"200": _json("{options: PublicKeyCredentialCreationOptions JSON}"),
                          **_errors(400, 401, 403)}},
        ("POST", f"{P}/webauthn/register/verify"): {
            "summary": "Verify and store a new credential (attestation none or packed)",
            "requestBody": body("register"),
            "responses": {"201": _json("The stored credential"),
                          **_errors(400, 401, 403, 409)}},
        ("POST", f"{P}/webauthn/authenticate/options"): {
            "summary": "WebAuthn authentication options (for navigator.credentials.get)",
            "requestBody": body("user"),
            "responses": {"200": _json("{options: PublicKeyCredentialRequestOptions JSON}"),
                          **_errors(400, 401, 403, 404)}},
        ("POST", f"{P}/webauthn/authenticate/verify"): {
            "summary": "Verify an assertion (a regressed sign counter with a genuine "
                       "signature disables the credential as cloned)",
            "requestBody": body("authenticate"), "responses": verified},
        ("GET", f"{P}/users"): {
            "summary": "Users with a confirmed second factor, and their methods",
            "responses": {"200": _json("{users: [{user, methods}]}"), **_errors(401, 403)}},
        ("GET", f"{P}/users/{{user}}"): {
            "summary": "A user's MFA state (no secrets)", "parameters": [user_path],
            "responses": {"200": _json("methods, totp, recovery_codes_left, webauthn, "
                                       "remembered_devices, remembered_networks"),
                          **_errors(401, 403)}},
        ("DELETE", f"{P}/users/{{user}}"): {
            "summary": "Reset: remove every factor, code and remembered device",
            "parameters": [user_path],
            "responses": {"200": _json("Reset"), **_errors(401, 403, 404)}},
        ("DELETE", f"{P}/users/{{user}}/totp"): {
            "summary": "Remove TOTP and its recovery codes", "parameters": [user_path],
            "responses": {"200": _json("Removed"), **_errors(401, 403, 404)}},
        ("DELETE", f"{P}/users/{{user}}/webauthn/{{credential_id}}"): {
            "summary": "Remove a WebAuthn credential",
            "parameters": [user_path, {"name": "credential_id", "in": "path",
                                       "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json("Removed"), **_errors(401, 403, 404)}},
    }
    paths: dict[str, Any] = {}
    for (method, path), op in ops.items():
        paths.setdefault(path, {})[method.lower()] = {
            **op, "security": admin, "x-required-scope": SCOPES[(method, path)]}
    return paths
