"""JSON API of federated identity: OIDC bearer tokens and the SAML service provider.

The routes exist always (so /openapi.json is the same everywhere) and answer 404 while
security.oidc / security.saml is disabled.
"""

from __future__ import annotations

from typing import Any

import jsonschema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exporter.http.security_routes import Authorize, Endpoint, _error, _json_body, actor, scoped
from exporter.service import Exporter
from security.federation.oidc import FederationError

TOKEN_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["token"],
    "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 16384}},
}
AUTHN_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"relay_state": {"type": "string", "maxLength": 80, "default": ""}},
}
ACS_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["saml_response"],
    "properties": {"saml_response": {"type": "string", "minLength": 1,
                                     "description": "The SAMLResponse form field (base64)"},
                   "relay_state": {"type": "string", "maxLength": 80, "default": ""}},
}
FEDERATION_SCOPES = {"oidc": "security:read", "saml.metadata": "security:read",
                     "saml.login": "security:write"}
_token = jsonschema.Draft7Validator(TOKEN_SCHEMA)
_authn = jsonschema.Draft7Validator(AUTHN_SCHEMA)
_acs = jsonschema.Draft7Validator(ACS_SCHEMA)


def federation_routes(exporter: Exporter, authorize: Authorize) -> list[Route]:
    services = exporter.identity
    if services is None:
        return []

    def guard(handler: Endpoint, scope: str) -> Endpoint:
        return scoped(authorize, handler, FEDERATION_SCOPES[scope])  # the table decides

    def disabled(what: str) -> Response:
        return _error(404, "not_found", f"{what} is disabled (security.{what.lower()}.enabled)")

    async def oidc_validate(request: Request) -> Response:
        if services.oidc is None:
            return disabled("OIDC")
        body = await _json_body(request, _token)
        return JSONResponse((await services.oidc.validate(body["token"])).as_dict())

    async def oidc_introspect(request: Request) -> Response:
        if services.oidc is None:
            return disabled("OIDC")
        body = await _json_body(request, _token)
        try:
            return JSONResponse(await services.oidc.introspect(body["token"]))
        except FederationError as exc:
            return _error(502, "provider_unavailable", f"introspection failed: {exc}")

    async def saml_metadata(request: Request) -> Response:
        if services.saml is None:
            return disabled("SAML")
        return Response(services.saml.metadata(), media_type="application/samlmetadata+xml")

    async def saml_authn_request(request: Request) -> Response:
        if services.saml is None:
            return disabled("SAML")
        body = await _json_body(request, _authn) if await request.body() else {}
        answer = await services.saml.authn_request(body.get("relay_state", ""),
                                                   actor=actor(request))
        return JSONResponse(answer, status_code=201)

    async def saml_acs(request: Request) -> Response:
        if services.saml is None:
            return disabled("SAML")
        body = await _json_body(request, _acs)
        result = await services.saml.acs(body["saml_response"], body.get("relay_state", ""))
        return JSONResponse(result.as_dict())

    v1 = "/api/v1"
    return [
        Route(f"{v1}/oidc/validate", guard(oidc_validate, "oidc"), methods=["POST"]),
        Route(f"{v1}/oidc/introspect", guard(oidc_introspect, "oidc"), methods=["POST"]),
        Route(f"{v1}/saml/metadata", guard(saml_metadata, "saml.metadata"), methods=["GET"]),
        Route(f"{v1}/saml/authn-request", guard(saml_authn_request, "saml.login"),
              methods=["POST"]),
        Route(f"{v1}/saml/acs", guard(saml_acs, "saml.login"), methods=["POST"]),
    ]


def federation_paths(security: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The OpenAPI description of the routes above (openapi.py merges it)."""
    from exporter.http.openapi import _json, scoped_operation

    def op(summary: str, scope: str, responses: dict[str, Any], *codes: int,
           body: dict[str, Any] | None = None) -> dict[str, Any]:
        return scoped_operation(security, summary, FEDERATION_SCOPES[scope], responses, 404,
                                *codes, body=body, description="404 while disabled.")

    verdict = {"type": "object", "required": ["valid"], "properties": {
        "valid": {"type": "boolean"}, "claims": {"type": "object"},
        "reason": {"type": "string", "description": "e.g. expired, wrong_audience, "
                                                    "bad_signature, algorithm_not_allowed"}}}
    return {
        "/api/v1/oidc/validate": {"post": op(
            "Validate a bearer JWT of the configured issuer (signature, iss, aud, exp, nbf)",
            "oidc", {"200": _json("Verdict", verdict)}, 400, body=TOKEN_SCHEMA)},
        "/api/v1/oidc/introspect": {"post": op(
            "RFC 7662 introspection of a token at the issuer", "oidc",
            {"200": _json("The issuer's answer ({active: false} for any unusable token)"),
             "502": _json("The introspection endpoint failed")}, 400, body=TOKEN_SCHEMA)},
        "/api/v1/saml/metadata": {"get": op(
            "SP metadata for the IdP", "saml.metadata",
            {"200": {"description": "SAML metadata", "content": {
                "application/samlmetadata+xml": {"schema": {"type": "string"}}}}})},
        "/api/v1/saml/authn-request": {"post": op(
            "Start a login: an AuthnRequest id and the IdP redirect URL", "saml.login",
            {"201": _json("request_id, url, binding")}, 400, body=AUTHN_SCHEMA)},
        "/api/v1/saml/acs": {"post": op(
            "Validate a Response the IdP posted to the ACS URL", "saml.login",
            {"200": _json("Verdict: valid, name_id, issuer, attributes, session_index, "
                          "in_response_to, relay_state; or valid false and reason")},
            400, body=ACS_SCHEMA)},
    }
