"""The OpenAPI 3.1 document served at /openapi.json, kept beside the route table."""

from __future__ import annotations

from typing import Any

from exporter import __version__
from exporter.config import Config
from exporter.custom_metrics import UPDATE_SCHEMA
from exporter.performance import PATHS, WINDOWS

_ERROR = {"type": "object", "required": ["error", "message"],
          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_WINDOW_STATS = {
    "type": "object",
    "required": ["window", "covered_seconds", "count", "errors", "rate", "error_rate", "mean",
                 "p50", "p95", "p99"],
    "properties": {"window": {"type": "string", "enum": list(WINDOWS)},
                   "covered_seconds": {"type": "number"}, "count": {"type": "integer"},
                   "errors": {"type": "integer"}, "rate": {"type": "number"},
                   "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
                   "mean": _NUMBER_OR_NULL, "p50": _NUMBER_OR_NULL, "p95": _NUMBER_OR_NULL,
                   "p99": _NUMBER_OR_NULL},
}
_WINDOWS = {"type": "object", "required": list(WINDOWS),
            "properties": {name: _WINDOW_STATS for name in WINDOWS}}
_PERFORMANCE = {
    "type": "object",
    "required": ["relative_error", "slot_seconds", "windows", "paths", "operations"],
    "properties": {
        "relative_error": {"type": "number"}, "slot_seconds": {"type": "integer"},
        "windows": {"type": "object", "additionalProperties": {"type": "integer"}},
        "paths": {"type": "array", "items": {"type": "object", "properties": {
            "path": {"type": "string"}, "description": {"type": "string"},
            "histogram": {"type": ["string", "null"]}, "windows": _WINDOWS}}},
        "operations": {"type": "array", "items": {"type": "object", "properties": {
            "path": {"type": "string"}, "operation": {"type": "string"},
            "windows": _WINDOWS}}},
    },
}


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NULLABLE_TIME = {"type": ["number", "null"], "description": "Unix time"}
_ALERTS = {
    "type": "object",
    "required": ["enabled", "evaluation_interval_seconds", "last_evaluation", "rules",
                 "alertmanager", "alerts"],
    "properties": {
        "enabled": {"type": "boolean"}, "evaluation_interval_seconds": {"type": "number"},
        "last_evaluation": _NULLABLE_TIME, "evaluations": {"type": "integer"},
        "evaluation_failures": {"type": "integer"}, "last_error": {"type": ["string", "null"]},
        "rules": {"type": "integer", "description": "Threshold alerts evaluated"},
        "alertmanager": {"type": "object", "properties": {
            "enabled": {"type": "boolean"}, "pushes": {"type": "integer"},
            "failures": {"type": "integer"}, "last_success": _NULLABLE_TIME,
            "last_error": {"type": ["string", "null"]}}},
        "alerts": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "severity", "state", "value", "threshold", "since", "labels",
                         "annotations"],
            "properties": {
                "name": {"type": "string"}, "severity": {"type": "string"},
                "state": {"type": "string", "enum": ["pending", "firing"]},
                "value": {"type": ["number", "string"],
                          "description": "In the threshold's unit (NaN, +Inf as strings)"},
                "threshold": {"type": "number"},
                "since": {"type": "number", "description": "Unix time it became pending, or "
                                                           "firing"},
                "active_at": {"type": "number"}, "fired_at": _NULLABLE_TIME,
                "keep_firing_since": {**_NULLABLE_TIME, "description": "Set while kept firing "
                                      "by alerting.keep_firing_for (the condition is false)"},
                "for_seconds": {"type": "number"}, "keep_firing_for_seconds": {"type": "number"},
                "labels": _STRING_MAP, "annotations": _STRING_MAP}}},
    },
}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Credentials missing or wrong", 429: "Rate limited",
            403: "API key lacks the route's scope (or, with security disabled, no admin "
                 "token configured)",
            404: "Not found", 409: "Conflict (nothing pending, or already there)",
            413: "Body too large", 422: "Series budget full",
            502: "Delivery to the relay or provider failed",
            503: "Provider unavailable (circuit open)"}
    return {str(code): _json(text[code], {"$ref": "#/components/schemas/Error"})
            for code in codes}


def scoped_operation(security: list[dict[str, list[str]]], summary: str, scope: str,
                     responses: dict[str, Any], *codes: int, body: dict[str, Any] | None = None,
                     params: tuple[str, ...] = (), description: str = "") -> dict[str, Any]:
    """One operation of a route behind `scoped` (the admin token or an API key with scope)."""
    out: dict[str, Any] = {
        "summary": summary, "security": security,
        "description": (description + " " if description else "")
        + f"Scope: {scope} (or the admin token).", "x-required-scope": scope,
        "responses": {**responses, **_errors(401, 403, *codes)}}
    if body is not None:
        out["requestBody"] = {"required": bool(body.get("required")),
                              "content": {"application/json": {"schema": body}}}
    if params:
        out["parameters"] = [{"name": p, "in": "path", "required": True,
                              "schema": {"type": "string"}} for p in params]
    return out


def _security_paths(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    """The security front ends and admin API; the admin routes say the scope an API key
    needs there, as `scoped` asks it (security:read to read, security:write to change)."""
    paths = _security_operations(admin)
    for path, operations in paths.items():
        if path.startswith("/api/v1/security/"):
            for method, operation in operations.items():
                scope = "security:read" if method == "get" else "security:write"
                operation["description"] = (operation.get("description", "") + " " if
                                            operation.get("description") else "") + (
                    f"Scope: {scope} (or the admin token).")
                operation["x-required-scope"] = scope
    return paths


def _security_operations(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    from exporter.http.security_routes import ATTEMPT_SCHEMA, BAN_SCHEMA

    def body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": schema}}}

    dovecot_request = {"type": "object", "required": ["login", "remote"],
                       "description": "As Dovecot 2.3 sends it: strings, except tls, success "
                                      "and policy_reject (booleans).",
                       "properties": {"login": {"type": "string"}, "remote": {"type": "string"},
                                      "pwhash": {"type": "string"},
                                      "protocol": {"type": "string"},
                                      "session_id": {"type": "string"},
                                      "tls": {"type": ["boolean", "string"]},
                                      "success": {"type": "boolean"},
                                      "policy_reject": {"type": "boolean"}}}
    dovecot_answer = {"type": "object", "required": ["status", "msg"],
                      "properties": {"status": {"type": "integer", "minimum": -1,
                                                "description": "-1 reject, 0 allow, N>0 delay "
                                                               "N seconds"},
                                     "msg": {"type": "string"}}}
    decision = {"type": "object", "properties": {
        "action": {"type": "string", "enum": ["allow", "delay", "reject", "mfa_required"],
                   "description": "mfa_required: check the password, then ask for a second "
                                  "factor (reason: risky_network, risky_source, new_device, "
                                  "new_source, factor_disabled); delay may be set as well"},
        "reason": {"type": "string"}, "delay": {"type": "number"},
        "message": {"type": "string"}, "retry_after": {"type": "number"}}}
    def unlock(account_in: str, summary: str) -> dict[str, Any]:
        return {"summary": f"{summary}: all its lockouts, or ?source=NETWORK only",
                "security": admin,
                "parameters": [{"name": "account", "in": account_in, "required": True,
                                "schema": {"type": "string"}},
                               {"name": "source", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": _json("Unlocked"), **_errors(400, 401, 403, 404)}}

    return {
        "/dovecot/policy": {"post": {
            "summary": "Dovecot auth policy (auth_policy_server_url)",
            "description": "Authenticated by security.dovecot_policy.api_key_header; loopback "
                           "may call without a key (allow_loopback_without_key).",
            "parameters": [{"name": "command", "in": "query", "required": True,
                            "schema": {"type": "string", "enum": ["allow", "report"]}}],
            "requestBody": body(dovecot_request),
            "responses": {"200": _json("Policy answer", dovecot_answer),
                          **_errors(400, 401, 413)}}},
        "/api/v1/webhooks/stalwart": {"post": {
            "summary": "Stalwart/A3Mailer webhook events (auth.*, security.*)",
            "description": "Authenticated by X-Signature: base64(HMAC-SHA256(secret, body)).",
            "parameters": [{"name": "X-Signature", "in": "header", "required": True,
                            "schema": {"type": "string"}}],
            "requestBody": body({"type": "object", "required": ["events"], "properties": {
                "events": {"type": "array", "items": {"type": "object", "required": [
                    "id", "createdAt", "type"]}}}}),
            "responses": {"200": _json("Events accepted, skipped (replayed or stale) and ignored "
                                         "(of no use to the engine)"),
                          **_errors(400, 401, 403, 413)}}},
        "/api/v1/security/check": {"post": {
            "summary": "May this login proceed? (before the password check)",
            "security": admin, "requestBody": body(ATTEMPT_SCHEMA),
            "responses": {"200": _json("Decision", decision), **_errors(400, 401, 403)}}},
        "/api/v1/security/report": {"post": {
            "summary": "Report a login's outcome (success required)",
            "security": admin, "requestBody": body(ATTEMPT_SCHEMA),
            "responses": {"200": _json("Recorded; actions taken (lock, account_lock, ban)"),
                          **_errors(400, 401, 403)}}},
        "/api/v1/security/lockouts": {"get": {
            "summary": "Lockouts in force", "security": admin,
            "responses": {"200": _json("Lockouts"), **_errors(401, 403)}},
            "delete": unlock("query", "Unlock ?account= (a login with a / in it)")},
        "/api/v1/security/lockouts/{account}": {"delete": unlock("path", "Unlock an account")},
        "/api/v1/security/blocklist": {
            "get": {"summary": "Banned networks", "security": admin,
                    "responses": {"200": _json("Bans"), **_errors(401, 403)}},
            "post": {"summary": "Ban a network", "security": admin,
                     "requestBody": body(BAN_SCHEMA),
                     "responses": {"201": _json("Banned"), **_errors(400, 401, 403)}},
            "delete": {"summary": "Unban a network", "security": admin,
                       "parameters": [{"name": "network", "in": "query", "required": True,
                                       "schema": {"type": "string"}}],
                       "responses": {"200": _json("Unbanned"), **_errors(400, 401, 403, 404)}},
        },
        "/api/v1/security/blocklist.txt": {
            "get": {"summary": "Export bans as plain text", "security": admin,
                    "responses": {"200": {"description": "One network per line",
                                          "content": {"text/plain": {"schema": {
                                              "type": "string"}}}}, **_errors(401, 403)}},
            "post": {"summary": "Import bans from plain text (?feed=NAME marks a feed)",
                     "security": admin,
                     "parameters": [{"name": "feed", "in": "query",
                                     "schema": {"type": "string"}}],
                     "requestBody": {"required": True, "content": {"text/plain": {
                         "schema": {"type": "string"}}}},
                     "responses": {"200": _json("Imported, with per-line errors"),
                                   **_errors(400, 401, 403)}},
        },
        "/api/v1/security/audit": {"get": {
            "summary": "Audit records, newest first",
            "security": admin,
            "parameters": [{"name": n, "in": "query", "schema": {"type": t}}
                           for n, t in (("start", "number"), ("end", "number"),
                                        ("type", "string"), ("actor", "string"),
                                        ("subject", "string"), ("limit", "integer"),
                                        ("cursor", "string"))],
            "responses": {"200": _json("Records and next_cursor"), **_errors(400, 401, 403)}}},
        "/api/v1/security/audit/verify": {"get": {
            "summary": "Verify the audit log's hash chain", "security": admin,
            "responses": {"200": _json("Chain intact"),
                          "409": _json("Chain broken: where and why"), **_errors(401, 403)}}},
    }


def _identity_paths(admin: list[dict[str, list[str]]]) -> dict[str, Any]:
    from exporter.http.federation_routes import federation_paths
    from exporter.http.identity_routes import identity_paths

    return {**identity_paths(admin), **federation_paths(admin)}


def openapi_document(config: Config) -> dict[str, Any]:
    from exporter.http.mfa_routes import mfa_paths

    health_path = config["monitoring"]["health_endpoint_path"]
    component = {
        "type": "object",
        "required": ["component", "status", "message", "response_time_ms", "details",
                     "timestamp"],
        "properties": {
            "component": {"type": "string"},
            "status": {"type": "string", "enum": ["healthy", "degraded", "unhealthy",
                                                  "unknown"]},
            "critical": {"type": "boolean"},
            "message": {"type": "string"},
            "response_time_ms": {"type": "number"},
            "details": {"type": "object"},
            "timestamp": {"type": "number", "description": "Unix time of the last check"},
        },
    }
    admin: list[dict[str, list[str]]] = [{"adminToken": []}, {"apiKey": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "a3mailer-exporter", "version": __version__,
                 "description": "Metrics, health and the JSON API of a3mailer-exporter."},
        "components": {
            "schemas": {"Error": _ERROR, "HealthComponent": component,
                        "CustomMetricUpdate": UPDATE_SCHEMA},
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "security.admin_token_file or A3MAILER_ADMIN_TOKEN"},
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "An API key (a3m_<id>_<secret>, POST /api/v1/apikeys) "
                                          "holding the route's scope"},
                "listenerBasic": {"type": "http", "scheme": "basic"},
                "listenerBearer": {"type": "http", "scheme": "bearer"},
            },
        },
        "paths": {
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "description": "Text format 0.0.4; OpenMetrics 1.0 when Accept asks for "
                               "application/openmetrics-text; gzip when Accept-Encoding allows.",
                "responses": {"200": {"description": "Metrics",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **_errors(404)}}},
            "/livez": {"get": {"summary": "Liveness: 200 while the process serves",
                               "responses": {"200": _json("Alive")}}},
            "/readyz": {"get": {
                "summary": "Readiness: 200 only while every critical component is healthy",
                "responses": {"200": _json("Ready"),
                              "503": _json("Not ready", {"type": "object", "properties": {
                                  "status": {"type": "string"},
                                  "reasons": {"type": "array", "items": {"type": "string"}}}})}}},
            health_path: {"get": {
                "summary": "Health of every component",
                "responses": {"200": _json("Health report", {
                    "type": "object", "required": ["status", "components"],
                    "properties": {
                        "status": {"type": "string"}, "ready": {"type": "boolean"},
                        "timestamp": {"type": "number"},
                        "components": {"type": "array", "items": {
                            "$ref": "#/components/schemas/HealthComponent"}}}}),
                    **_errors(404)}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": _json("OpenAPI document")}}},
            "/-/reload": {"post": {
                "summary": "Reload the config file (as SIGHUP does)",
                "description": "Scope: admin (or the admin token).",
                "security": admin, "x-required-scope": "admin",
                "responses": {"200": _json("Reloaded"), **_errors(400, 401, 403)}}},
            "/api/v1/monitoring/history": {"get": {
                "summary": "System snapshots and health statuses kept for retention_period",
                "parameters": [
                    {"name": "start", "in": "query", "schema": {"type": "string"},
                     "description": "Unix timestamp or RFC 3339 time (inclusive)"},
                    {"name": "end", "in": "query", "schema": {"type": "string"},
                     "description": "Unix timestamp or RFC 3339 time (inclusive)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1},
                     "description": "Only the newest N entries"},
                ],
                "responses": {"200": _json("History"), **_errors(400)}}},
            **(_identity_paths(admin) if config["security"]["enabled"] else {}),
            "/api/v1/performance": {"get": {
                "summary": "Sliding-window performance per path and operation",
                "description": "1m, 5m and 15m windows of every instrumented path (http, "
                               "security, store, collector, schedule) and operation: count, "
                               "rate per second, errors, error_rate (0..1), mean and "
                               "p50/p95/p99 latency in seconds (within relative_error).",
                "parameters": [{"name": "path", "in": "query", "schema": {
                    "type": "string", "enum": list(PATHS)}, "description": "Only this path"}],
                "responses": {"200": _json("Windows", _PERFORMANCE), **_errors(400)}}},
            "/api/v1/alerts": {"get": {
                "summary": "Pending and firing threshold alerts of the in-process engine",
                "description": "The threshold alerts of the generated rules as the engine "
                               "(alerting.engine) evaluates them, with the labels and "
                               "annotations Prometheus would give them; 404 when the engine is "
                               "disabled.",
                "parameters": [{"name": "state", "in": "query", "schema": {
                    "type": "string", "enum": ["pending", "firing"]},
                    "description": "Only alerts in this state"}],
                "responses": {"200": _json("Alerts", _ALERTS), **_errors(400, 404)}}},
            "/api/v1/metrics/custom/{name}": {"post": {
                "summary": "Set or add to a metric declared in monitoring.custom_metrics",
                "description": "Scope: metrics:write (or the admin token).",
                "security": admin, "x-required-scope": "metrics:write",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/CustomMetricUpdate"}}}},
                "responses": {"200": _json("The series' new value"),
                              **_errors(400, 401, 403, 404, 413, 422)}}},
            **(_security_paths(admin) if config["security"]["enabled"] else {}),
            **(mfa_paths(admin) if config["security"]["enabled"]
               and config["security"]["mfa"]["enabled"] else {}),
        },
    }
