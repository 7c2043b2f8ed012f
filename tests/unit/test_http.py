"""The ASGI app in process: every endpoint, auth, limits, reload, readiness."""

from __future__ import annotations

import base64
import gzip
import os
import shutil

import bcrypt
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import ConfigError, load_config
from exporter.http import create_app
from exporter.service import Exporter


@pytest.fixture
def serve(config_file, tmp_path):
    """Builds (exporter, client) for a config; the client talks to the app in process.

    Background tasks are not started: tests drive health rounds themselves.
    """

    built: list[Exporter] = []

    async def build(content=None):
        data = yaml.safe_load(content) if isinstance(content, str) else dict(content or {})
        data.setdefault("server", {}).setdefault("state_dir",
                                                 str(tmp_path / f"state{len(built)}"))
        exporter = Exporter(load_config(config_file(data, name=f"config{len(built)}.yaml")))
        built.append(exporter)
        await exporter.health.run_once()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(exporter)),
                                   base_url="http://exporter")
        return exporter, client

    yield build
    for exporter in built:
        if exporter.audit is not None:
            exporter.audit.close()


def metric_value(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{name}{labels} not found")


async def test_metrics_text_format(serve):
    _, client = await serve()
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 0 <= metric_value(r.text, "a3mailer_system_cpu_usage_ratio") <= 1
    assert metric_value(r.text, "a3mailer_exporter_collector_success", collector="system") == 1
    assert metric_value(r.text, "a3mailer_health_status", component="state_dir",
                        status="healthy") == 1
    assert metric_value(r.text, "a3mailer_exporter_build_info") == 1


async def test_metrics_openmetrics_and_gzip(serve):
    _, client = await serve()
    r = await client.get("/metrics", headers={"accept": "application/openmetrics-text; "
                                                        "version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")
    r = await client.get("/metrics", headers={"accept-encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    # httpx decodes transparently; the raw body really is gzip
    assert b"a3mailer_system_cpu_usage_ratio" in r.content
    raw = await client.get("/metrics", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in raw.headers
    assert len(gzip.compress(raw.content)) < len(raw.content)


async def test_livez_and_health_document(serve):
    _, client = await serve()
    assert (await client.get("/livez")).json() == {"status": "alive"}
    doc = (await client.get("/health")).json()
    assert doc["status"] in {"healthy", "degraded"}
    names = {c["component"] for c in doc["components"]}
    assert names == {"state_dir", "config", "system", "security_store"}
    for c in doc["components"]:
        assert c["status"] in {"healthy", "degraded", "unhealthy", "unknown"}
        assert set(c) >= {"component", "status", "message", "response_time_ms", "details",
                          "timestamp"}


async def test_health_path_and_switches_follow_config(serve):
    _, client = await serve({"monitoring": {"health_endpoint_path": "/status/health",
                                            "enable_prometheus": False}})
    assert (await client.get("/status/health")).status_code == 200
    assert (await client.get("/health")).status_code == 404
    assert (await client.get("/metrics")).status_code == 404


async def test_every_built_in_route_is_refused_as_the_health_path(serve, config_file,
                                                                   tmp_path):
    """The config check's list of built-in routes covers every route the app serves."""
    exporter, _ = await serve({"security": {"enabled": True}})
    paths = {route.path for route in create_app(exporter).app.routes}
    paths.discard(exporter.config["monitoring"]["health_endpoint_path"])
    assert {"/metrics", "/-/reload", "/dovecot/policy", "/api/v1/sessions/{id}"} <= paths
    for path in paths:
        concrete = path.replace("{", "").replace("}", "")
        with pytest.raises(ConfigError, match="monitoring.health_endpoint_path"):
            load_config(config_file({"monitoring": {"health_endpoint_path": concrete}}))


async def test_readyz_turns_503_when_a_critical_component_fails(serve, tmp_path):
    exporter, client = await serve({"monitoring": {"failure_threshold": 2}})
    assert (await client.get("/readyz")).status_code == 200
    shutil.rmtree(exporter.state_dir)
    exporter.state_dir.write_text("not a directory")  # writes into it now fail
    await exporter.health.run_once()
    assert (await client.get("/readyz")).status_code == 200  # one failure: streak not reached
    await exporter.health.run_once()
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["reasons"][0].startswith("state_dir is unhealthy: cannot write")
    metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "a3mailer_exporter_ready") == 0
    os.remove(exporter.state_dir)
    exporter.state_dir.mkdir()
    await exporter.health.run_once()
    assert (await client.get("/readyz")).status_code == 200


async def test_unknown_path_and_method_give_json(serve):
    _, client = await serve()
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "message": "no route /nope"}
    r = await client.delete("/metrics")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


async def test_openapi_lists_every_route(serve):
    from starlette.routing import Route

    exporter, client = await serve()
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    app = create_app(exporter)
    table = {(route.path, method.lower()) for route in app.app.routes
             if isinstance(route, Route) for method in route.methods - {"HEAD"}}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert table == documented
    assert {"/metrics", "/dovecot/policy", "/api/v1/security/check"} <= set(doc["paths"])


def admin_config(tmp_path, extra=None):
    token = tmp_path / "admin.token"
    token.write_text("admin-secret-0123456\n")
    return {"security": {"admin_token_file": str(token)}, **(extra or {})}


ADMIN = {"authorization": "Bearer admin-secret-0123456"}


async def test_admin_endpoints_need_the_admin_token(serve, tmp_path):
    _, client = await serve({"security": {"enabled": False}})  # no API keys either
    r = await client.post("/-/reload")
    assert r.status_code == 403 and "admin_token_file" in r.json()["message"]
    _, client = await serve()  # API keys could authorise: missing credentials are a 401
    assert (await client.post("/-/reload")).status_code == 401
    _, client = await serve(admin_config(tmp_path))
    assert (await client.post("/-/reload")).status_code == 401
    r = await client.post("/-/reload", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert (await client.post("/-/reload", headers=ADMIN)).status_code == 200


async def test_reload_success_and_rejection(serve, tmp_path):
    exporter, client = await serve(admin_config(tmp_path))
    path = exporter.config.path
    data = yaml.safe_load(path.read_text())
    data["monitoring"] = {"alert_thresholds": {"cpu_usage_threshold": 42}}
    path.write_text(yaml.safe_dump(data))
    r = await client.post("/-/reload", headers=ADMIN)
    assert r.status_code == 200
    assert exporter.config["monitoring"]["alert_thresholds"]["cpu_usage_threshold"] == 42
    metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "a3mailer_exporter_config_last_reload_successful") == 1

    data["monitoring"] = {"alert_thresholds": {"cpu_usage_threshold": 420}}
    path.write_text(yaml.safe_dump(data))
    r = await client.post("/-/reload", headers=ADMIN)
    assert r.status_code == 400
    assert "out of range: 420 must be <= 100" in r.json()["problems"][0]
    assert exporter.config["monitoring"]["alert_thresholds"]["cpu_usage_threshold"] == 42
    metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "a3mailer_exporter_config_last_reload_successful") == 0
    records, _ = exporter.audit.query(types=["config.reload"])
    assert [(r["actor"], r["details"]["ok"]) for r in records] == [("admin", False),
                                                                   ("admin", True)]
    for _ in range(3):  # failure_threshold
        await exporter.health.run_once()
    config_health = [c for c in (await client.get("/health")).json()["components"]
                     if c["component"] == "config"][0]
    assert config_health["status"] == "degraded"


async def test_custom_metrics_endpoint(serve, tmp_path):
    _, client = await serve(admin_config(tmp_path, {"monitoring": {"custom_metrics": [
        {"name": "queue_depth", "type": "gauge", "help": "Messages waiting",
         "labels": ["queue"], "max_series": 1}]}}))
    url = "/api/v1/metrics/custom/queue_depth"
    assert (await client.post(url, json={"value": 1})).status_code == 401
    r = await client.post(url, json={"value": 7, "labels": {"queue": "active"}}, headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {"metric": "a3mailer_custom_queue_depth", "labels": {"queue": "active"},
                        "value": 7.0}
    metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "a3mailer_custom_queue_depth", queue="active") == 7
    r = await client.post(url, json={"value": "seven", "labels": {"queue": "a"}}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["message"].startswith("value:")
    r = await client.post(url, json={"value": 1, "labels": {"queue": "other"}}, headers=ADMIN)
    assert r.status_code == 422
    r = await client.post(url, content=b"{not json", headers=ADMIN)
    assert r.status_code == 400
    r = await client.post("/api/v1/metrics/custom/undeclared", json={"value": 1}, headers=ADMIN)
    assert r.status_code == 404


async def test_custom_metric_bodies_the_schema_refuses_are_counted(serve, tmp_path):
    """A body refused by the body schema (op "mul", value "3", not JSON) was a 400 that
    a3mailer_exporter_custom_metric_rejections_total never counted."""
    _, client = await serve(admin_config(tmp_path, {"monitoring": {"custom_metrics": [
        {"name": "depth", "type": "gauge", "help": "x", "labels": ["queue"]}]}}))
    url = "/api/v1/metrics/custom/depth"
    bodies = {
        "wrong_type": ['{"value": 1, "op": "mul", "labels": {"queue": "a"}}'],
        "bad_value": ['{"value": "3", "labels": {"queue": "a"}}', '{"labels": {"queue": "a"}}'],
        "bad_labels": ['{"value": 1, "labels": {"queue": 7}}', '{"value": 1, "labels": []}'],
        "bad_body": ["{not json", "[1]", '{"value": 1, "labels": {"queue": "a"}, "x": 1}'],
        "personal_data": ['{"value": 1, "labels": {"queue": "192.168.001.001"}}'],
    }
    for reason, contents in bodies.items():
        for content in contents:
            r = await client.post(url, content=content, headers=ADMIN)
            assert r.status_code == 400, content
    r = await client.post("/api/v1/metrics/custom/undeclared", content="{not json",
                          headers=ADMIN)
    assert r.status_code == 400
    metrics = (await client.get("/metrics")).text
    for reason, contents in bodies.items():
        assert metric_value(metrics, "a3mailer_exporter_custom_metric_rejections_total",
                            metric="depth", reason=reason) == len(contents), reason
    assert 'metric="undeclared"' not in metrics  # made-up names grow no series


async def test_body_size_limit(serve, tmp_path):
    _, client = await serve(admin_config(tmp_path, {"server": {"max_request_body_bytes": 1024}}))
    r = await client.post("/-/reload", content=b"x" * 5000, headers=ADMIN)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"

    async def chunks():  # no content-length: counted while streaming
        for _ in range(5):
            yield b"y" * 1000

    r = await client.post("/api/v1/metrics/custom/x", content=chunks(), headers=ADMIN)
    assert r.status_code == 413


async def test_basic_and_bearer_listener_auth(serve, tmp_path):
    token = tmp_path / "bearer"
    token.write_text("scrape-token")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    _, client = await serve({"server": {"auth": {"basic_auth_users": {"prom": hashed},
                                                 "bearer_token_file": str(token)}}})
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.get("/livez")).status_code == 200  # open for kubelet
    assert (await client.get("/readyz")).status_code == 200
    good = base64.b64encode(b"prom:pw").decode()
    bad = base64.b64encode(b"prom:nope").decode()
    ghost = base64.b64encode(b"ghost:pw").decode()
    assert (await client.get("/metrics", headers={"authorization": f"Basic {good}"})
            ).status_code == 200
    assert (await client.get("/metrics", headers={"authorization": f"Basic {good}"})
            ).status_code == 200  # cached path
    for header in (f"Basic {bad}", f"Basic {ghost}", "Basic !!!", "Bearer nope", "Token x"):
        assert (await client.get("/metrics", headers={"authorization": header})
                ).status_code == 401, header
    assert (await client.get("/metrics", headers={"authorization": "Bearer scrape-token"})
            ).status_code == 200


async def test_a_basic_password_past_72_bytes_is_a_wrong_one(serve, monkeypatch):
    """bcrypt 5 raises on a password past 72 bytes: it used to be an unauthenticated 500.
    It is refused as a wrong password, after one bcrypt run like any other (timing)."""
    hashed = bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(rounds=4)).decode()
    _, client = await serve({"server": {"auth": {"basic_auth_users": {"prom": hashed}}}})
    checks: list[bytes] = []
    checkpw = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw",
                        lambda secret, h: checks.append(secret) or checkpw(secret, h))
    for user in ("prom", "nobody"):
        long = base64.b64encode(f"{user}:{'a' * 100}".encode()).decode()
        r = await client.get("/metrics", headers={"authorization": f"Basic {long}"})
        assert r.status_code == 401, user
    assert checks == [b"a" * 72, b"a" * 72]  # bcrypt paid for each, on 72 bytes
    exact = base64.b64encode(b"prom:" + b"a" * 72).decode()
    assert (await client.get("/metrics", headers={"authorization": f"Basic {exact}"})
            ).status_code == 200


async def test_history_endpoint(serve):
    exporter, client = await serve()
    exporter.history.add({"n": 1}, now=1000)
    exporter.history.add({"n": 2}, now=2000)
    doc = (await client.get("/api/v1/monitoring/history", params={"start": 1500})).json()
    assert [e["n"] for e in doc["entries"]] == [2]
    doc = (await client.get("/api/v1/monitoring/history",
                            params={"start": "1970-01-01T00:15:00Z",
                                    "end": "1970-01-01T00:20:00Z"})).json()
    assert [e["n"] for e in doc["entries"]] == [1]
    assert doc["capacity"] == 2881 and doc["interval_seconds"] == 30
    r = await client.get("/api/v1/monitoring/history", params={"start": "yesterday"})
    assert r.status_code == 400
    for params in ({"start": "nan"}, {"end": "inf"}, {"start": 2000, "end": 1000}):
        r = await client.get("/api/v1/monitoring/history", params=params)
        assert r.status_code == 400 and r.json()["error"] == "bad_request", params


async def test_requests_are_counted_by_route_template(serve, tmp_path):
    exporter, client = await serve(admin_config(tmp_path))
    await client.post("/api/v1/metrics/custom/a", json={"value": 1}, headers=ADMIN)
    await client.get("/nope")
    assert exporter.http_requests.value(("/api/v1/metrics/custom/{name}", "404")) == 1
    assert exporter.http_requests.value(("other", "404")) == 1


async def test_answers_before_routing_count_under_their_route(serve, tmp_path):
    """A 401 (listener auth) or 413 (body limit) is the guard's answer, given before the
    router runs: it still counts under the route the request was for, not `other`."""
    token = tmp_path / "bearer"
    token.write_text("scrape-token")
    exporter, client = await serve({"server": {"auth": {"bearer_token_file": str(token)},
                                               "max_request_body_bytes": 1024}})
    assert (await client.get("/metrics")).status_code == 401
    assert (await client.post("/api/v1/metrics/custom/q", content=b"x" * 2000,
                              headers={"authorization": "Bearer scrape-token"})
            ).status_code == 413
    assert (await client.get("/no/such/path")).status_code == 401  # no route: still other
    assert exporter.http_requests.value(("/metrics", "401")) == 1
    assert exporter.http_requests.value(("/api/v1/metrics/custom/{name}", "413")) == 1
    assert exporter.http_requests.value(("other", "401")) == 1
    assert exporter.performance.stats("1m", "http", "/metrics").count == 1


async def test_the_performance_api_takes_one_path(serve):
    _, client = await serve()
    r = await client.get("/api/v1/performance?path=http&path=store")
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert (await client.get("/api/v1/performance?path=store")).json()["paths"][0][
        "path"] == "store"


async def test_api_rate_limits_send_ratelimit_headers_and_429(serve, tmp_path):
    _, client = await serve(admin_config(tmp_path, {"security": {
        "admin_token_file": str(tmp_path / "admin.token"),
        "rate_limits": {"anonymous_requests_per_minute": 60, "burst_allowance": 2,
                        "authenticated_requests_per_minute": 600}}}))
    url = "/api/v1/monitoring/history"
    first = await client.get(url)
    assert first.status_code == 200
    assert first.headers["ratelimit-limit"] == "3"
    assert first.headers["ratelimit-remaining"] == "2"
    await client.get(url)
    await client.get(url)
    refused = await client.get(url)
    assert refused.status_code == 429 and refused.json()["error"] == "rate_limited"
    assert refused.headers["retry-after"] == "1"
    # the admin token is its own, larger budget
    ok = await client.get(url, headers=ADMIN)
    assert ok.status_code == 200 and ok.headers["ratelimit-limit"] == "3"
    assert (await client.get("/metrics")).status_code == 200  # only /api/ is limited
    metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "a3mailer_security_rate_limited_total", **{"class": "anonymous"}
                        ) == 1


async def test_guessing_the_admin_token_on_reload_is_throttled_and_the_admin_is_not(
        serve, tmp_path):
    """/-/reload takes the admin token too, and wrong tokens there were never limited
    (40 answers of 401 in a row in a review, against 11 and then 429 under /api/)."""
    _, client = await serve(admin_config(tmp_path, {"security": {
        "admin_token_file": str(tmp_path / "admin.token"),
        "rate_limits": {"anonymous_requests_per_minute": 60, "burst_allowance": 2}}}))
    wrong = {"authorization": "Bearer not-the-admin-token-0123"}
    answers = [(await client.post("/-/reload", headers=wrong)).status_code for _ in range(5)]
    assert answers == [401, 401, 401, 429, 429]
    for _ in range(5):  # the admin's own reloads stay unlimited
        assert (await client.post("/-/reload", headers=ADMIN)).status_code == 200


async def test_api_answers_are_never_cached_or_sniffed(serve, tmp_path):
    _, client = await serve(admin_config(tmp_path))
    for method, path in (("POST", "/api/v1/metrics/custom/nope"),
                         ("GET", "/api/v1/monitoring/history"), ("GET", "/api/v1/nope"),
                         ("POST", "/-/reload")):
        r = await client.request(method, path, headers=ADMIN, json={"value": 1})
        assert r.headers["cache-control"] == "no-store", (path, r.status_code)
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert "cache-control" not in (await client.get("/livez")).headers


async def test_rate_limiting_can_be_switched_off(serve):
    _, client = await serve({"security": {"enable_rate_limiting": False}})
    for _ in range(20):
        r = await client.get("/api/v1/monitoring/history")
        assert r.status_code == 200 and "ratelimit-limit" not in r.headers


async def test_bad_unlock_source_and_audit_cursor_are_400_not_500(serve, tmp_path):
    """Found by the schemathesis run (tests/reliability/test_fuzz_api.py)."""
    _, client = await serve(admin_config(tmp_path))
    r = await client.delete("/api/v1/security/lockouts/alice", params={"source": "\x00nope"},
                            headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert "source" in r.json()["message"]
    r = await client.get("/api/v1/security/audit", params={"cursor": "$'\x07"}, headers=ADMIN)
    assert r.status_code == 400 and "cursor" in r.json()["message"]
    assert (await client.get("/livez")).status_code == 200


# --- the policy route called straight from the Guard, against the way through Starlette

POLICY_CASES = [
    # (name, method, path, query, body chunks, client host, extra headers)
    ("allow", "POST", "/dovecot/policy", b"command=allow",
     [b'{"login":"al","remote":"192.0.2.5","pwhash":"a","protocol":"imap"}'], "127.0.0.1", []),
    *[(f"report {n}", "POST", "/dovecot/policy", b"command=report",
       [b'{"login":"al","remote":"192.0.2.5","pwhash":"h%d","success":false}' % n],
       "127.0.0.1", []) for n in range(4)],
    ("allow, locked", "POST", "/dovecot/policy", b"command=allow",
     [b'{"login":"al","remote":"192.0.2.5","pwhash":"a"}'], "127.0.0.1", []),
    ("other query", "POST", "/dovecot/policy", b"x=1&command=allow",
     [b'{"login":"bo","remote":"192.0.2.6"}'], "127.0.0.1", []),
    ("no command", "POST", "/dovecot/policy", b"", [b"{}"], "127.0.0.1", []),
    ("not JSON", "POST", "/dovecot/policy", b"command=allow", [b"{nope"], "127.0.0.1", []),
    ("in chunks", "POST", "/dovecot/policy", b"command=allow",
     [b'{"login":"cy",', b'"remote":"192.0.2.7"}'], "127.0.0.1", []),
    ("over the limit", "POST", "/dovecot/policy", b"command=allow", [b" " * 600] * 3,
     "127.0.0.1", []),
    ("declared over the limit", "POST", "/dovecot/policy", b"command=allow", [b"{}"],
     "127.0.0.1", [(b"content-length", b"5000")]),
    ("not loopback", "POST", "/dovecot/policy", b"command=allow", [b"{}"], "192.0.2.1", []),
    ("client gone", "POST", "/dovecot/policy", b"command=allow", None, "127.0.0.1", []),
    ("engine fails", "POST", "/dovecot/policy", b"command=allow",
     [b'{"login":"boom","remote":"192.0.2.8"}'], "127.0.0.1", []),
    ("GET", "GET", "/dovecot/policy", b"command=allow", [b""], "127.0.0.1", []),
    ("HEAD", "HEAD", "/dovecot/policy", b"command=allow", [b""], "127.0.0.1", []),
    ("slash", "POST", "/dovecot/policy/", b"command=allow", [b"{}"], "127.0.0.1", []),
]


async def _call(app, case) -> tuple[list, str, dict]:
    """One request through an ASGI app: (messages sent, exception raised, scope after)."""
    _, method, path, query, chunks, host, headers = case
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "server": ("127.0.0.1", 9100), "client": (host, 40000),
             "scheme": "http", "root_path": "", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": query,
             "headers": [(b"host", b"exporter"), (b"content-type", b"application/json"),
                         *headers], "state": {}}
    messages = [{"type": "http.disconnect"}] if chunks is None else [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)]
    sent: list = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as exc:
        return sent, f"{type(exc).__name__}: {exc}", scope
    return sent, "", scope


async def test_policy_route_called_directly_answers_as_through_starlette(make_exporter,
                                                                          tmp_path):
    def config(state: str) -> dict:
        return {"server": {"max_request_body_bytes": 1024, "state_dir": str(tmp_path / state)},
                "security": {"store": {"type": "memory"}, "trusted_networks": [],
                             "max_login_attempts": 3,
                             "tarpit": {"delay_per_failure": "1s", "max_delay": "3s"}}}

    direct_exporter, general_exporter = make_exporter(config("a")), make_exporter(config("b"))
    direct, general = create_app(direct_exporter), create_app(general_exporter)
    assert direct.direct is not None
    general.direct = None  # every request through Starlette's middleware and router
    for exporter in (direct_exporter, general_exporter):
        check = exporter.security.check

        async def failing(attempt, check=check):
            if attempt.login == "boom":
                raise RuntimeError("store down")
            return await check(attempt)

        exporter.security.check = failing
    statuses = {}
    try:
        for case in POLICY_CASES:
            got, want = await _call(direct, case), await _call(general, case)
            statuses[case[0]] = got[0][0]["status"]
            assert got[:2] == want[:2], case[0]
            # the same scope entries, but for ExceptionMiddleware's own, which only the
            # way through Starlette sets
            direct_keys = set(got[2])
            assert direct_keys == set(want[2]) or (
                direct_keys == set(want[2]) - {"starlette.exception_handlers"}
                and case[2] == "/dovecot/policy" and case[1] == "POST"), case[0]
            assert got[2].get("route") is None or (
                got[2]["route"].path == want[2]["route"].path), case[0]
            assert got[2].get("path_params") == want[2].get("path_params"), case[0]
        assert direct_exporter.http_requests._values == general_exporter.http_requests._values
        assert (direct_exporter.security_frontends._values
                == general_exporter.security_frontends._values)
        assert (statuses["allow, locked"], statuses["not JSON"], statuses["over the limit"],
                statuses["not loopback"], statuses["engine fails"]) == (200, 400, 413, 401, 500)
    finally:
        for exporter in (direct_exporter, general_exporter):
            if exporter.audit is not None:
                exporter.audit.close()


@pytest.mark.parametrize("path", ["/api/v1/webhooks/stalwart", "/dovecot/policy",
                                  "/api/v1/passwords/check"])
async def test_a_client_gone_before_its_body_is_no_server_error(serve, tmp_path, path, caplog):
    """A client that closes mid-body (Content-Length promised more) raised ClientDisconnect
    through the app: a 500 in the metrics and an error with its traceback in the log."""
    (tmp_path / "webhook.secret").write_text("webhook-secret\n")
    exporter, _ = await serve(admin_config(tmp_path, {"security": {
        "admin_token_file": str(tmp_path / "admin.token"),
        "stalwart_webhook": {"enabled": True,
                             "secret_file": str(tmp_path / "webhook.secret")}}}))
    app = create_app(exporter)
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b"{}", "more_body": True},
                {"type": "http.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": b"command=allow", "root_path": "", "scheme": "http",
             "http_version": "1.1", "client": ("127.0.0.1", 40000),
             "server": ("127.0.0.1", 9100),
             "headers": [(b"content-length", b"100"), (b"content-type", b"application/json"),
                         (b"authorization", b"Bearer admin-secret-0123456")]}
    await app(scope, receive, send)  # raises nothing
    assert sent[0]["status"] == 499
    route = "/dovecot/policy" if path == "/dovecot/policy" else path
    assert exporter.http_requests.value((route, "499")) == 1
    assert exporter.http_requests.value((route, "500")) == 0
    assert "Traceback" not in caplog.text and "ClientDisconnect" not in caplog.text


async def test_every_json_body_with_a_duplicate_key_is_400_naming_it(serve, tmp_path):
    """json.loads keeps the last value of a repeated key; a proxy, a WAF or a log reader
    may keep the first. Each place the API parses JSON (the shared body reader, the custom
    metric route, the Dovecot policy) refuses the body instead."""
    _, client = await serve(admin_config(tmp_path, {
        "security": {"admin_token_file": str(tmp_path / "admin.token"),
                     "store": {"type": "memory"}},
        "monitoring": {"custom_metrics": [{"name": "depth", "type": "gauge", "help": "x"}]}}))
    for path, body, key in (
            ("/api/v1/sessions", '{"user": "a", "user": "b"}', "user"),
            ("/api/v1/apikeys",
             '{"name": "x", "scopes": ["metrics:write"], "scopes": ["admin"]}', "scopes"),
            ("/api/v1/security/check",
             '{"login": "a", "remote_ip": "192.0.2.1", "login": "b"}', "login"),
            ("/api/v1/metrics/custom/depth", '{"value": 1, "value": 2}', "value"),
            ("/dovecot/policy?command=allow",
             '{"login": "a", "remote": "192.0.2.1", "login": "b"}', "login")):
        r = await client.post(path, content=body, headers=ADMIN)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"] == "bad_request"
        assert f"duplicate key '{key}'" in r.json()["message"], path
    r = await client.post("/api/v1/metrics/custom/depth", json={"value": 3}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["value"] == 3
