"""The OpenAPI 3.1 document served at /openapi.json, kept beside the route table."""

from __future__ import annotations

from typing import Any

from exporter import __version__
from exporter.config import Config
from exporter.custom_metrics import UPDATE_SCHEMA

_ERROR = {"type": "object", "required": ["error", "message"],
          "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Credentials missing or wrong",
            403: "Admin endpoints disabled (no admin token configured)",
            404: "Not found", 413: "Body too large", 422: "Series budget full"}
    return {str(code): _json(text[code], {"$ref": "#/components/schemas/Error"})
            for code in codes}


def openapi_document(config: Config) -> dict[str, Any]:
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
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
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
                "security": admin,
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
            "/api/v1/metrics/custom/{name}": {"post": {
                "summary": "Set or add to a metric declared in monitoring.custom_metrics",
                "security": admin,
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/CustomMetricUpdate"}}}},
                "responses": {"200": _json("The series' new value"),
                              **_errors(400, 401, 403, 404, 413, 422)}}},
        },
    }
