# ruff: noqa: F811 - fixtures imported from test_http are parameters of the tests
"""The identity JSON API in process: API keys authorising every admin route by scope,
sessions, CSRF, passwords, bad input, metrics and audit (the exporter's engines started,
SQLite store in a temp state dir)."""

from __future__ import annotations

import contextlib

import httpx
import pytest
import yaml

from exporter.config import load_config
from exporter.http import create_app
from exporter.service import Exporter
from tests.unit.test_http import ADMIN, metric_value, serve  # noqa: F401 - a fixture

FAST_ARGON2 = {"time_cost": 1, "memory_cost_kib": 1024, "parallelism": 1}


@pytest.fixture
async def running(config_file, tmp_path):
    """start(extra config) -> (exporter, client): engines started, app in process."""
    stack = contextlib.AsyncExitStack()
    token = tmp_path / "admin.token"
    token.write_text("admin-secret-0123456\n")

    async def start(extra: dict | None = None, state: str = "state"):
        data = {"server": {"state_dir": str(tmp_path / state)},
                "security": {"admin_token_file": str(token),
                             "password_policy": {"argon2": FAST_ARGON2}}}
        for section, values in (extra or {}).items():
            data.setdefault(section, {}).update(values)
        exporter = Exporter(load_config(config_file(yaml.safe_dump(data),
                                                    name=f"{state}.yaml")))
        await exporter.start()
        stack.push_async_callback(exporter.stop)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(exporter)),
                                   base_url="http://exporter")
        return exporter, client

    yield start
    await stack.aclose()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def new_key(client, scopes, **extra) -> dict:
    r = await client.post("/api/v1/apikeys", headers=ADMIN,
                          json={"name": "test", "scopes": scopes, **extra})
    assert r.status_code == 201, r.text
    return r.json()


async def test_every_documented_scope_is_the_one_the_route_asks(running):
    """/openapi.json's x-required-scope on every route behind the admin token or a key:
    a key holding only another scope gets 403 there, one holding it gets past (any
    answer but 401/403: a missing body or object is the route's own business)."""
    _, client = await running()
    doc = (await client.get("/openapi.json")).json()
    keys = {scope: (await new_key(client, [scope]))["key"]
            for scope in ("security:read", "security:write", "metrics:write", "admin")}
    checked = 0
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if {"adminToken": []} not in operation.get("security", []):
                continue
            scope = operation["x-required-scope"]
            url = path.replace("{", "").replace("}", "")  # a path parameter: its own name
            for held, key in keys.items():
                r = await client.request(method.upper(), url, headers=bearer(key))
                if held == scope:
                    assert r.status_code not in (401, 403), (method, path, held, r.text)
                elif held != "admin":
                    assert r.status_code == 403, (method, path, held, r.status_code)
            checked += 1
    assert checked > 40


async def test_api_keys_authorise_admin_routes_by_scope(running):
    exporter, client = await running()
    reader = await new_key(client, ["security:read"])
    writer = await new_key(client, ["security:write"])
    metrics = await new_key(client, ["metrics:write"])
    root = await new_key(client, ["admin"])
    assert reader["key"].startswith(f"a3m_{reader['id']}_") and reader["state"] == "active"
    lockouts = "/api/v1/security/lockouts"
    ban = {"network": "192.0.2.0/24", "reason": "test"}
    assert (await client.get(lockouts, headers=bearer(reader["key"]))).status_code == 200
    r = await client.post("/api/v1/security/blocklist", json=ban,
                          headers=bearer(reader["key"]))
    assert r.status_code == 403 and "security:write" in r.json()["message"]
    r = await client.post("/api/v1/security/blocklist", json=ban,
                          headers=bearer(writer["key"]))
    assert r.status_code == 201
    assert (await client.get(lockouts, headers=bearer(writer["key"]))).status_code == 403
    # /-/reload needs admin (tested below), custom metrics metrics:write
    assert (await client.post("/-/reload", headers=bearer(metrics["key"]))).status_code == 403
    r = await client.post("/api/v1/metrics/custom/none", json={"value": 1},
                          headers=bearer(metrics["key"]))
    assert r.status_code == 404  # past authorisation: no such metric declared
    assert (await client.post("/api/v1/metrics/custom/none", json={"value": 1},
                              headers=bearer(reader["key"]))).status_code == 403
    # managing keys needs admin
    assert (await client.get("/api/v1/apikeys", headers=bearer(writer["key"]))).status_code \
        == 403
    listed = (await client.get("/api/v1/apikeys", headers=bearer(root["key"]))).json()["keys"]
    assert {k["id"] for k in listed} == {reader["id"], writer["id"], metrics["id"], root["id"]}
    assert all("key" not in k and "hash" not in k for k in listed)
    assert all(root["key"] not in str(k) for k in listed)
    # the audit log names the key that acted
    records, _ = exporter.audit.query(types=["blocklist."], limit=10)
    assert records[0]["actor"] == f"apikey:{writer['id']}"


async def test_reload_needs_the_admin_scope(serve, tmp_path):
    # not started (a reload right before stop() trips the health loop: see the report)
    from tests.unit.test_http import admin_config

    exporter, client = await serve(admin_config(tmp_path, {"security": {
        "admin_token_file": str(tmp_path / "admin.token"), "store": {"type": "memory"}}}))
    root = await new_key(client, ["admin"])
    writer = await new_key(client, ["security:write"])
    assert (await client.post("/-/reload", headers=bearer(writer["key"]))).status_code == 403
    assert (await client.post("/-/reload", headers=bearer(root["key"]))).status_code == 200
    records, _ = exporter.audit.query(types=["config.reload"], limit=1)
    assert records[0]["actor"] == f"apikey:{root['id']}"


async def test_wrong_unknown_revoked_and_expired_keys_get_the_same_401(running):
    exporter, client = await running()
    good = await new_key(client, ["admin"])
    short = await new_key(client, ["admin"], expires_in=60)
    revoked = await new_key(client, ["admin"])
    r = await client.delete(f"/api/v1/apikeys/{revoked['id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked"]["state"] == "revoked"
    assert (await client.delete("/api/v1/apikeys/000000000000", headers=ADMIN)).status_code \
        == 404
    exporter.identity.apikeys.clock = lambda: short["expires"] + 1
    secret = good["key"].split("_", 2)[2]
    answers = []
    for token in (good["key"][:-1] + ("A" if good["key"][-1] != "A" else "B"),
                  f"a3m_000000000000_{secret}", revoked["key"], short["key"], "a3m_junk",
                  "not-even-a-key", ""):
        r = await client.get("/api/v1/security/lockouts", headers=bearer(token))
        answers.append((r.status_code, r.json()))
    assert len(set(map(str, answers))) == 1, answers
    assert answers[0][0] == 401 and answers[0][1]["error"] == "unauthorized"
    assert (await client.get("/api/v1/security/lockouts", headers={})).status_code == 401
    assert (await client.get("/api/v1/security/lockouts",
                             headers=bearer(good["key"]))).status_code == 200
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_identity_verification_failures_total",
                        method="apikey", reason="revoked") == 1
    assert metric_value(text, "a3mailer_identity_verification_failures_total",
                        method="apikey", reason="expired") == 1


async def test_the_active_keys_gauge_drops_at_expiry_not_at_the_next_listing(running):
    exporter, client = await running()
    await new_key(client, ["security:read"])
    await new_key(client, ["security:read"], expires_in=60)
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_identity_active_api_keys") == 2
    keys = exporter.identity.apikeys
    start = keys.clock()
    keys.clock = lambda: start + 61
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_identity_active_api_keys") == 1


async def test_rotate_a_key_and_the_old_one_stops(running):
    _, client = await running()
    old = await new_key(client, ["security:read"])
    r = await client.post(f"/api/v1/apikeys/{old['id']}/rotate", headers=ADMIN, json={})
    assert r.status_code == 201
    new = r.json()
    assert new["replaces"]["id"] == old["id"] and new["scopes"] == ["security:read"]
    assert (await client.get("/api/v1/security/lockouts",
                             headers=bearer(old["key"]))).status_code == 401
    assert (await client.get("/api/v1/security/lockouts",
                             headers=bearer(new["key"]))).status_code == 200


async def test_a_key_over_its_rate_limit_gets_429(running):
    exporter, client = await running({"security": {"api_keys": {"rate_limit_burst": 1}}})
    key = await new_key(client, ["security:read"], rate_limit_per_minute=1)
    answers = []
    for _ in range(3):
        r = await client.get("/api/v1/security/lockouts", headers=bearer(key["key"]))
        answers.append((r.status_code, r.headers["ratelimit-remaining"]))
    # the first check loads the key records; the later ones are decided at once (held)
    assert exporter.identity.apikeys.held
    assert answers == [(200, "1"), (200, "0"), (429, "0")]
    assert int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit-limit"] == "2"
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_security_rate_limited_total", **{"class": "apikey"}) \
        == 1
    assert metric_value(text, "a3mailer_identity_verifications_total", method="apikey",
                        result="success") == 2


async def test_api_keys_and_sessions_survive_a_restart(running):
    exporter, client = await running()
    key = await new_key(client, ["security:read"])
    session = (await client.post("/api/v1/sessions", headers=ADMIN,
                                 json={"user": "alice@example.org"})).json()
    await exporter.stop()
    _, again = await running(state="state")
    assert (await again.get("/api/v1/security/lockouts",
                            headers=bearer(key["key"]))).status_code == 200
    r = await again.get(f"/api/v1/sessions/{session['session_id']}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["user"] == "alice@example.org"
    r = await again.post("/api/v1/csrf/verify", headers=ADMIN, json={
        "session_id": session["session_id"], "token": session["csrf_token"]})
    # the generated CSRF key was kept in the state dir
    assert r.json() == {"valid": True, "required": True}


async def test_session_lifecycle_and_csrf(running):
    exporter, client = await running()
    r = await client.post("/api/v1/sessions", headers=ADMIN, json={"user": "bob@example.org"})
    assert r.status_code == 201
    s = r.json()
    assert {"session_id", "csrf_token", "expires_at", "cookie"} <= set(s)
    assert s["cookie"].startswith(f"__Host-a3m_session={s['session_id']}; Path=/;")
    assert all(p in s["cookie"] for p in ("Secure", "HttpOnly", "SameSite=Strict"))
    sid = s["session_id"]
    r = await client.get(f"/api/v1/sessions/{sid}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["user"] == "bob@example.org"
    assert exporter.identity.sessions.held  # from now on validated at once, from memory
    verify = "/api/v1/csrf/verify"
    ok = await client.post(verify, headers=ADMIN, json={"session_id": sid,
                                                        "token": s["csrf_token"]})
    assert ok.json() == {"valid": True, "required": True}
    bad = await client.post(verify, headers=ADMIN, json={"session_id": sid,
                                                         "token": s["csrf_token"][:-2] + "xx"})
    assert bad.json() == {"valid": False, "required": True}
    rotated = (await client.post(f"/api/v1/sessions/{sid}/rotate", headers=ADMIN,
                                 json={"privilege": "admin"})).json()
    assert rotated["session_id"] != sid and rotated["privilege"] == "admin"
    assert (await client.get(f"/api/v1/sessions/{sid}", headers=ADMIN)).status_code == 404
    stale = await client.post(verify, headers=ADMIN, json={"session_id": sid,
                                                           "token": s["csrf_token"]})
    assert stale.json() == {"valid": False, "required": True}
    new_sid = rotated["session_id"]
    refreshed = await client.post(f"/api/v1/sessions/{new_sid}/refresh", headers=ADMIN)
    assert refreshed.status_code == 200 and refreshed.json()["csrf_token"]
    r = await client.delete(f"/api/v1/sessions/{new_sid}", headers=ADMIN)
    assert r.status_code == 200 and "Max-Age=0" in r.json()["cookie"]
    assert (await client.get(f"/api/v1/sessions/{new_sid}", headers=ADMIN)).status_code == 404
    assert (await client.delete(f"/api/v1/sessions/{new_sid}", headers=ADMIN)).status_code \
        == 404
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_identity_csrf_failures_total", reason="bad_mac") == 1
    assert metric_value(text, "a3mailer_identity_csrf_failures_total", reason="no_session") == 1
    assert metric_value(text, "a3mailer_identity_active_sessions") == 0
    # get, csrf ok, csrf bad, rotate, refresh (the stale csrf and the gets after: failures)
    assert metric_value(text, "a3mailer_identity_verifications_total", method="session",
                        result="success") == 5
    assert "bob@example.org" not in text
    types = [r["type"] for r in exporter.audit.query(types=["session."], limit=10)[0]]
    assert types == ["session.revoke", "session.rotate", "session.create"]


async def test_csrf_not_required_when_the_operator_turns_it_off(running):
    _, client = await running({"security": {"enable_csrf_protection": False}})
    s = (await client.post("/api/v1/sessions", headers=ADMIN,
                           json={"user": "bob@example.org"})).json()
    for token in (s["csrf_token"], "forged"):
        r = await client.post("/api/v1/csrf/verify", headers=ADMIN,
                              json={"session_id": s["session_id"], "token": token})
        assert r.status_code == 200 and r.json() == {"valid": True, "required": False}


async def test_the_session_cap_and_ending_all_sessions_of_a_user(running):
    _, client = await running({"security": {"session_config": {"max_sessions_per_user": 2}}})
    ids = [(await client.post("/api/v1/sessions", headers=ADMIN,
                              json={"user": "carol"})).json()["session_id"] for _ in range(3)]
    codes = [(await client.get(f"/api/v1/sessions/{i}", headers=ADMIN)).status_code
             for i in ids]
    assert codes == [404, 200, 200]
    r = await client.delete("/api/v1/sessions?user=carol", headers=ADMIN)
    assert r.json() == {"revoked": 2}
    assert (await client.delete("/api/v1/sessions", headers=ADMIN)).status_code == 400


async def test_password_check_and_history(running):
    _, client = await running()
    check = "/api/v1/passwords/check"
    r = await client.post(check, headers=ADMIN, json={"password": "password"})
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] is False and "blocklisted" in body["reasons"]
    assert isinstance(body["score"], int)
    r = await client.post(check, headers=ADMIN, json={"password": "dave-mailbox-2024",
                                                      "user": "dave@example.org"})
    assert r.json()["accepted"] is False and "context" in r.json()["reasons"]
    strong = {"password": "Quartz lantern drifts over 9 fjords", "user": "dave@example.org"}
    assert (await client.post(check, headers=ADMIN, json=strong)).json()["accepted"] is True
    r = await client.post("/api/v1/passwords/history", headers=ADMIN, json=strong)
    assert r.status_code == 201 and r.json()["history_length"] == 1
    r = await client.post(check, headers=ADMIN, json=strong)
    assert r.json()["reasons"] == ["reused"]
    assert (await client.delete("/api/v1/passwords/history/dave@example.org",
                                headers=ADMIN)).status_code == 200
    assert (await client.post(check, headers=ADMIN, json=strong)).json()["accepted"] is True
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_identity_password_rejections_total",
                        reason="blocklisted") == 1
    assert "dave" not in text


@pytest.mark.parametrize("path,payload", [
    ("/api/v1/apikeys", {"name": "x", "scopes": ["root"]}),
    ("/api/v1/apikeys", {"name": "x", "scopes": []}),
    ("/api/v1/apikeys", {"name": "x", "scopes": ["admin"], "expires_in": 0}),
    ("/api/v1/apikeys", {"name": "x" * 201, "scopes": ["admin"]}),
    ("/api/v1/apikeys", {"name": "x", "scopes": ["admin"], "expires_in": 10 ** 10}),
    ("/api/v1/sessions", {}),
    ("/api/v1/sessions", {"user": "u" * 400}),
    ("/api/v1/csrf/verify", {"session_id": "s"}),
    ("/api/v1/csrf/verify", {"session_id": "s" * 200, "token": "t"}),
    ("/api/v1/passwords/check", {"password": "p" * 5000}),
    ("/api/v1/passwords/check", {"password": 12345}),
    ("/api/v1/passwords/check", "not json"),
    ("/api/v1/sessions", '{"user": "pat\\ud800"}'),
])
async def test_bad_input_gets_400_and_the_api_keeps_serving(running, path, payload):
    _, client = await running()
    if isinstance(payload, str):
        r = await client.post(path, headers=ADMIN, content=payload)
    else:
        r = await client.post(path, headers=ADMIN, json=payload)
    assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text
    assert r.json()["message"]
    assert (await client.post("/api/v1/passwords/check", headers=ADMIN,
                              json={"password": "fine-passphrase-here"})).status_code == 200


async def test_an_oversized_body_gets_413(running):
    _, client = await running({"server": {"max_request_body_bytes": 1024}})
    r = await client.post("/api/v1/passwords/check", headers=ADMIN,
                          json={"password": "x" * 2000})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


async def test_identity_routes_need_credentials(running):
    _, client = await running()
    for method, path in (("POST", "/api/v1/apikeys"), ("GET", "/api/v1/apikeys"),
                         ("POST", "/api/v1/sessions"), ("GET", "/api/v1/sessions/x"),
                         ("POST", "/api/v1/csrf/verify"), ("POST", "/api/v1/passwords/check")):
        r = await client.request(method, path, json={})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path


async def test_an_api_key_passes_listener_auth_on_the_routes_it_serves(running, tmp_path):
    listener = tmp_path / "listener.token"
    listener.write_text("scrape-secret\n")
    _, client = await running({"server": {"auth": {"bearer_token_file": str(listener)}}})
    key = await new_key(client, ["security:read"])
    assert (await client.get("/api/v1/security/lockouts",
                             headers=bearer(key["key"]))).status_code == 200
    assert (await client.get("/metrics", headers=bearer(key["key"]))).status_code == 401
    assert (await client.get("/metrics", headers=bearer("scrape-secret"))).status_code == 200


async def test_the_seed_spelling_of_cookie_same_site(running):
    _, client = await running({"security": {"session_config": {"cookie_same_site": "lax"}}})
    r = await client.post("/api/v1/sessions", headers=ADMIN, json={"user": "u"})
    assert r.json()["cookie"].endswith("SameSite=Lax")


async def test_a_bad_field_is_named_never_quoted(running):
    """jsonschema's messages quote the value: a too-long password came back whole in the
    400 (and a front end logging API errors would have kept it)."""
    _, client = await running()
    secret = "e0cgnZt-" * 1000
    for payload, expected in (({"password": secret}, "password: longer than 4096 characters"),
                              ({"password": 12345678}, "password: expected a string")):
        r = await client.post("/api/v1/passwords/check", headers=ADMIN, json=payload)
        assert r.status_code == 400 and r.json()["message"] == expected
        assert "e0cgnZt" not in r.text and "12345678" not in r.text
    r = await client.post("/api/v1/mfa/totp/verify", headers=ADMIN,
                          json={"user": "a", "code": "9" * 65})
    assert r.status_code == 400 and "9" * 10 not in r.text


async def test_revoking_a_key_answers_its_last_use(running):
    _, client = await running()
    key = await new_key(client, ["security:read"])
    assert (await client.get("/api/v1/security/lockouts",
                             headers=bearer(key["key"]))).status_code == 200
    listed = (await client.get(f"/api/v1/apikeys/{key['id']}", headers=ADMIN)).json()
    revoked = (await client.delete(f"/api/v1/apikeys/{key['id']}", headers=ADMIN)).json()
    assert listed["last_used"] is not None
    assert revoked["revoked"]["last_used"] == listed["last_used"]
    assert revoked["revoked"]["state"] == "revoked"
