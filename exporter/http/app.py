"""Route table and thin endpoints: parse, call one engine method, format."""

from __future__ import annotations

import gzip
import math
from datetime import datetime
from typing import Any

import jsonschema
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from exporter.config import Config
from exporter.custom_metrics import UPDATE_SCHEMA, UpdateError, body_reason
from exporter.exposition import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    render_openmetrics,
    render_text,
)
from exporter.http.auth import NOBODY, Identity, ListenerAuth, identify
from exporter.http.federation_routes import federation_routes
from exporter.http.identity_routes import identity_routes
from exporter.http.mfa_routes import mfa_routes
from exporter.http.middleware import (
    STORE_RETRY_AFTER,
    STORE_UNAVAILABLE,
    BodyTooLarge,
    DirectRoute,
    Guard,
    api_limits,
    count_store_outage,
    outage_classes,
)
from exporter.http.openapi import openapi_document
from exporter.http.security_routes import (
    BadRequest,
    _json_body,
    security_routes,
    split_policy_route,
)
from exporter.service import Exporter

_update_validator = jsonschema.Draft7Validator(UPDATE_SCHEMA)
GZIP_MIN_BYTES = 1024


def error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


def create_app(exporter: Exporter) -> ASGIApp:
    """The ASGI app for one Exporter; the Guard in front rebuilds its auth on reload."""
    config = exporter.config

    async def metrics(request: Request) -> Response:
        if not exporter.config["monitoring"]["enable_prometheus"]:
            return error(404, "not_found", "/metrics is disabled (monitoring.enable_prometheus)")
        openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
        body = await run_in_threadpool(_render, exporter, openmetrics)
        headers = {"content-type": CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT}
        if len(body) >= GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            headers["content-encoding"] = "gzip"
        headers["vary"] = "Accept, Accept-Encoding"
        return Response(body, headers=headers)

    async def livez(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        ready, reasons = exporter.health.ready()
        if ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)

    async def health(request: Request) -> Response:
        if not exporter.config["monitoring"]["enable_health_endpoint"]:
            return error(404, "not_found", "the health document is disabled "
                                           "(monitoring.enable_health_endpoint)")
        return JSONResponse(exporter.health.report())

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(exporter.config))

    async def reload(request: Request) -> Response:
        denied = await authorize(request, "admin")
        if denied:
            return denied
        problems = exporter.reload(actor=request.state.identity.actor)
        if problems:
            return error(400, "invalid_config", "config rejected; the previous config keeps "
                                                "running", problems=problems)
        return JSONResponse({"status": "reloaded", "source": exporter.config.source})

    async def history(request: Request) -> Response:
        try:
            start = _time_param(request, "start")
            end = _time_param(request, "end")
            limit_text = request.query_params.get("limit")
            limit = int(limit_text) if limit_text else None
            if limit is not None and limit < 1:
                raise ValueError("limit must be >= 1")
            if start is not None and end is not None and end < start:
                raise ValueError("end is before start")
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        entries = exporter.history.query(start, end, limit)
        return JSONResponse({
            "retention_seconds": exporter.history.retention,
            "interval_seconds": exporter.history.interval,
            "capacity": exporter.history.capacity,
            "count": len(entries),
            "entries": entries,
        })

    async def performance(request: Request) -> Response:
        if len(request.query_params.getlist("path")) > 1:
            return error(400, "bad_request", "give path once")
        try:
            body = exporter.performance.snapshot(request.query_params.get("path") or None)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        return JSONResponse(body)

    async def active_alerts(request: Request) -> Response:
        if not exporter.config["alerting"]["engine"]["enabled"]:
            return error(404, "not_found", "the alert engine is disabled "
                                           "(alerting.engine.enabled)")
        state = request.query_params.get("state") or None
        if state not in (None, "pending", "firing"):
            return error(400, "bad_request", "state must be pending or firing")
        return JSONResponse({**exporter.alerts.status(),
                             "alerts": exporter.alerts.snapshot(state)})

    async def custom_metric(request: Request) -> Response:
        denied = await authorize(request, "metrics:write")
        if denied:
            return denied
        name = request.path_params["name"]
        try:
            body = await _json_body(request, _update_validator)
        except BadRequest as exc:
            exporter.custom.count_rejection(name, body_reason(exc.error))
            return error(400, "bad_request", str(exc))
        try:
            value = exporter.custom.update(name, body)
        except UpdateError as exc:
            return error(exc.status, exc.code, exc.reason)
        metric = exporter.custom.metrics[name]
        return JSONResponse({"metric": metric.spec.name, "labels": body.get("labels", {}),
                             "value": value})

    async def authorize(request: Request, scope: str) -> Response | None:
        """None when the caller holds `scope` (the admin token holds every scope), else the
        answer: 401 for no or wrong credentials (a revoked or expired key too), 403 for a
        valid key without the scope, 429 for a key over its rate limit."""
        state = request.scope.setdefault("state", {})
        identity: Identity | None = state.get("identity")
        if identity is None:
            services = exporter.identity
            identity = await identify(guard.auth, services.apikeys if services else None,
                                      request.headers.get("authorization"))
            state["identity"] = identity
        if identity.allows(scope):
            return None
        check = identity.check
        if check is not None and check.reason == "rate_limited":
            return error(429, "rate_limited", "this API key is over its rate limit")
        if check is not None and check.ok:
            return error(403, "forbidden", f"this API key lacks the scope {scope!r}")
        if identity is NOBODY and guard.auth.admin is None and exporter.identity is None:
            return error(403, "forbidden", "admin endpoints are disabled: set "
                                           "security.admin_token_file or the "
                                           "A3MAILER_ADMIN_TOKEN environment variable")
        return JSONResponse({"error": "unauthorized", "message": f"the admin token or an API "
                                                                 f"key with scope {scope!r} "
                                                                 "required"},
                            status_code=401, headers={"www-authenticate": "Bearer"})

    async def not_found(request: Request, exc: Exception) -> Response:
        code = getattr(exc, "status_code", 404)
        if code == 405:
            return error(405, "method_not_allowed", f"{request.method} not allowed on "
                                                    f"{request.url.path}")
        if code == 404:
            return error(404, "not_found", f"no route {request.url.path}")
        return error(code, "error", str(getattr(exc, "detail", "")))

    async def too_large(request: Request, exc: Exception) -> Response:
        limit = exporter.config["server"]["max_request_body_bytes"]
        return error(413, "payload_too_large", f"request body over {limit} bytes")

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(500, "internal_error", "internal error; see the exporter log")

    async def store_outage(request: Request, exc: Exception) -> Response:
        count_store_outage(exporter, type(exc).__name__)
        return JSONResponse(STORE_UNAVAILABLE, status_code=503,
                            headers={"retry-after": STORE_RETRY_AFTER[0][1].decode()})

    async def client_gone(request: Request, exc: Exception) -> Response:
        # the client closed the connection before its body came: no one reads an answer,
        # and it is no server error (counted as nginx's 499, Client Closed Request)
        return Response(status_code=499)

    # Starlette tries routes in order: the Dovecot policy endpoint (two requests per login,
    # the busiest route by far) goes first, so it is not matched against ten others first
    hot, security = split_policy_route(security_routes(exporter, authorize))
    routes = [
        *hot,
        Route("/metrics", metrics, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route(config["monitoring"]["health_endpoint_path"], health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/-/reload", reload, methods=["POST"]),
        Route("/api/v1/monitoring/history", history, methods=["GET"]),
        Route("/api/v1/performance", performance, methods=["GET"]),
        Route("/api/v1/alerts", active_alerts, methods=["GET"]),
        Route("/api/v1/metrics/custom/{name}", custom_metric, methods=["POST"]),
    ]
    routes += security
    routes += identity_routes(exporter, authorize)
    routes += federation_routes(exporter, authorize)
    routes += mfa_routes(exporter, authorize)
    app = Starlette(routes=routes, exception_handlers={
        HTTPException: not_found, BodyTooLarge: too_large, ClientDisconnect: client_gone,
        **dict.fromkeys(outage_classes(config), store_outage), 500: server_error})
    # the policy route (first in the table) is called straight from the Guard
    direct = DirectRoute(app, hot[0]) if hot else None
    guard = Guard(app, exporter, ListenerAuth(config["server"], config["security"]), direct)

    def rebuild_auth(new: Config) -> None:
        guard.auth = ListenerAuth(new["server"], new["security"])
        guard.limits = api_limits(new.data)

    exporter.on_reload.append(rebuild_auth)
    return guard


def _render(exporter: Exporter, openmetrics: bool) -> bytes:
    families = exporter.scrape.collect()
    return render_openmetrics(families) if openmetrics else render_text(families)


def _time_param(request: Request, name: str) -> float | None:
    """A Unix timestamp or an RFC 3339 time, as Prometheus's API takes them."""
    text = request.query_params.get(name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):  # nan and inf read as numbers, and mean no time
            raise ValueError(f"{name}: not a time")
        return value
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ValueError(f"{name}: expected a Unix timestamp or RFC 3339 time, "
                         f"got {text!r}") from None
