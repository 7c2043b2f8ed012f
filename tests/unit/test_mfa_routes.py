"""The /api/v1/mfa routes in process: the contract, authorisation, bad input, metrics,
OpenAPI, and mfa_required in the security check and the Dovecot policy answer."""

from __future__ import annotations

import re

import pyotp
import pytest

from exporter.http.mfa_routes import SCOPES
from tests.unit.test_http import ADMIN, admin_config, metric_value, serve  # noqa: F401
from tests.webauthn_authenticator import SoftAuthenticator

ORIGIN = "https://mail.example.test"


def mfa_config(tmp_path, security=None, **mfa):
    return admin_config(tmp_path, {"security": {
        "admin_token_file": str(tmp_path / "admin.token"), "store": {"type": "memory"},
        "trusted_networks": [], **(security or {}),
        "mfa": {"encryption_key_file": str(key_file(tmp_path)),
                "webauthn": {"rp_id": "mail.example.test", "origins": [ORIGIN]}, **mfa}}})


def key_file(tmp_path):
    path = tmp_path / "mfa.key"
    path.write_text("0123456789abcdef0123456789abcdef-test-key\n")
    return path


@pytest.fixture
async def api(serve, tmp_path):  # noqa: F811
    exporter, client = await serve(mfa_config(tmp_path))
    yield exporter, client
    await client.aclose()


async def test_enroll_and_verify_follow_the_contract(api):
    _, client = api
    r = await client.post("/api/v1/mfa/totp/enroll", json={"user": "alice@example.org"},
                          headers=ADMIN)
    assert r.status_code == 200
    enrolled = r.json()
    secret = enrolled["secret"]
    assert re.fullmatch(r"[A-Z2-7]{32,}", secret)  # base32 of >= 160 bits
    assert enrolled["provisioning_uri"].startswith("otpauth://totp/")
    assert enrolled["qr_svg"].startswith("<svg") and len(enrolled["recovery_codes"]) == 10
    code = pyotp.TOTP(secret).now()
    r = await client.post("/api/v1/mfa/totp/verify",
                          json={"user": "alice@example.org", "code": code}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["valid"] is True
    r = await client.post("/api/v1/mfa/totp/verify",
                          json={"user": "alice@example.org", "code": code}, headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"valid": False, "method": "totp",
                                                 "reason": "replayed"}
    r = await client.post("/api/v1/mfa/recovery/verify", json={
        "user": "alice@example.org", "code": enrolled["recovery_codes"][0]}, headers=ADMIN)
    assert r.json()["valid"] is True and r.json()["remaining"] == 9
    status = (await client.get("/api/v1/mfa/users/alice@example.org", headers=ADMIN)).json()
    assert status["methods"] == ["totp", "recovery"] and status["totp"]["confirmed"]
    assert secret not in str(status)
    listed = (await client.get("/api/v1/mfa/users", headers=ADMIN)).json()
    assert listed == {"users": [{"user": "alice@example.org", "methods": ["totp", "recovery"]}]}


async def test_every_route_needs_the_admin_token(serve, tmp_path):  # noqa: F811
    _, client = await serve(mfa_config(tmp_path, {"enable_rate_limiting": False}))
    for (method, path), _scope in SCOPES.items():
        url = path.replace("{user}", "alice").replace("{credential_id}", "x")
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic eA=="}):
            r = await client.request(method, url, json={"user": "alice"}, headers=headers)
            assert r.status_code == 401, (method, url, headers)
            assert r.json()["error"] == "unauthorized"
    no_token = {"security": {"store": {"type": "memory"},
                             "mfa": {"encryption_key_file": str(key_file(tmp_path))}}}
    _, closed = await serve(no_token)
    r = await closed.post("/api/v1/mfa/totp/enroll", json={"user": "a"}, headers=ADMIN)
    assert r.status_code == 401  # no admin token: only an API key could be right here


async def test_scopes_are_named_for_every_route(api):
    exporter, client = api
    assert set(SCOPES.values()) == {"security:read", "security:write"}
    assert SCOPES[("POST", "/api/v1/mfa/totp/verify")] == "security:write"
    assert SCOPES[("POST", "/api/v1/mfa/totp/enroll")] == "security:write"
    assert SCOPES[("GET", "/api/v1/mfa/users")] == "security:read"
    doc = (await client.get("/openapi.json")).json()
    for (method, path), scope in SCOPES.items():
        assert doc["paths"][path][method.lower()]["x-required-scope"] == scope


@pytest.mark.parametrize("path, body, expected", [
    ("/api/v1/mfa/totp/verify", b"not json", "UTF-8 JSON"),
    ("/api/v1/mfa/totp/verify", b"\xff\xfe", "UTF-8 JSON"),
    ("/api/v1/mfa/totp/verify", b"[]", "(body)"),
    ("/api/v1/mfa/totp/verify", b'{"user": "a"}', "code"),
    ("/api/v1/mfa/totp/verify", b'{"user": "a", "code": 123456}', "code"),
    ("/api/v1/mfa/totp/verify", b'{"user": "", "code": "1"}', "user"),
    ("/api/v1/mfa/totp/verify", b'{"user": "a\\nb", "code": "1"}', "user"),
    ("/api/v1/mfa/totp/enroll", b'{"user": "   "}', "user"),  # was the account ""
    ("/api/v1/mfa/email/send", b'{"user": " ", "address": "a@b.c"}', "user"),
    ("/api/v1/mfa/totp/verify", b'{"user": "a", "code": "' + b"1" * 65 + b'"}', "code"),
    ("/api/v1/mfa/totp/verify", b'{"user": "a", "code": "1", "extra": 1}', "extra"),
    ("/api/v1/mfa/totp/verify", b'{"user": "a", "code": "1", "remote_ip": "x"}', "remote_ip"),
    ("/api/v1/mfa/totp/enroll", b'{"user": "' + b"u" * 300 + b'"}', "user"),
    ("/api/v1/mfa/totp/enroll", b'{"user": "pat\\ud800"}', "lone surrogate"),
    ("/api/v1/mfa/totp/verify", b'{"user": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "nested too deeply"),
    ("/api/v1/mfa/webauthn/register/verify", b'{"user": "a", "credential": "x"}',
     "credential"),
])
async def test_bad_input_gets_a_clear_400_and_the_api_keeps_serving(api, path, body, expected):
    _, client = api
    r = await client.post(path, content=body, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    assert expected in r.json()["message"]
    r = await client.post("/api/v1/mfa/totp/enroll", json={"user": "still"}, headers=ADMIN)
    assert r.status_code == 200


async def test_oversized_bodies_get_413(api):
    exporter, client = api
    limit = exporter.config["server"]["max_request_body_bytes"]
    r = await client.post("/api/v1/mfa/webauthn/register/verify",
                          content=b'{"user": "a", "credential": {"x": "' + b"a" * limit + b'"}}',
                          headers=ADMIN)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


async def test_unconfigured_channels_and_missing_things_answer_clearly(api):
    _, client = api
    r = await client.post("/api/v1/mfa/email/send", json={"user": "a", "address": "a@b.c"},
                          headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"] == "channel_disabled"
    r = await client.post("/api/v1/mfa/email/verify", json={"user": "a", "code": "123456"},
                          headers=ADMIN)
    assert r.json() == {"valid": False, "method": "email", "reason": "no_code",
                        "attempts_left": 0}
    r = await client.post("/api/v1/mfa/webauthn/authenticate/options", json={"user": "a"},
                          headers=ADMIN)
    assert r.status_code == 404 and r.json()["error"] == "not_enrolled"
    r = await client.post("/api/v1/mfa/recovery/regenerate", json={"user": "a"}, headers=ADMIN)
    assert r.status_code == 404
    assert (await client.delete("/api/v1/mfa/users/a", headers=ADMIN)).status_code == 404
    assert (await client.delete("/api/v1/mfa/users/a/totp", headers=ADMIN)).status_code == 404
    r = await client.delete("/api/v1/mfa/users/a/webauthn/xyz", headers=ADMIN)
    assert r.status_code == 404


async def test_webauthn_over_the_api(api):
    _, client = api
    key = SoftAuthenticator("packed")
    r = await client.post("/api/v1/mfa/webauthn/register/options",
                          json={"user": "bob", "display_name": "Bob"}, headers=ADMIN)
    options = r.json()["options"]
    r = await client.post("/api/v1/mfa/webauthn/register/verify", json={
        "user": "bob", "credential": key.create(options, ORIGIN), "name": "yubi"},
        headers=ADMIN)
    assert r.status_code == 201 and r.json()["credential_id"] == key.id
    r = await client.post("/api/v1/mfa/webauthn/register/verify", json={
        "user": "bob", "credential": key.create(options, ORIGIN)}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"] == "no_challenge"
    r = await client.post("/api/v1/mfa/webauthn/authenticate/options", json={"user": "bob"},
                          headers=ADMIN)
    assertion = key.get(r.json()["options"], ORIGIN)
    r = await client.post("/api/v1/mfa/webauthn/authenticate/verify", json={
        "user": "bob", "credential": assertion}, headers=ADMIN)
    assert r.json()["valid"] is True and r.json()["sign_count"] == 1
    r = await client.delete(f"/api/v1/mfa/users/bob/webauthn/{key.id}", headers=ADMIN)
    assert r.status_code == 200


async def test_metrics_count_by_method_and_result_without_user_names(api):
    _, client = api
    enrolled = (await client.post("/api/v1/mfa/totp/enroll", json={"user": "carol@example.org"},
                                  headers=ADMIN)).json()
    code = pyotp.TOTP(enrolled["secret"]).now()
    for _ in range(2):
        await client.post("/api/v1/mfa/totp/verify",
                          json={"user": "carol@example.org", "code": code}, headers=ADMIN)
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_mfa_verifications_total", method="totp",
                        result="success") == 1
    assert metric_value(text, "a3mailer_mfa_verifications_total", method="totp",
                        result="replayed") == 1
    assert metric_value(text, "a3mailer_mfa_enrollments_total", method="totp",
                        action="confirm") == 1
    assert "carol" not in text and code not in text


async def test_the_security_check_answers_mfa_required_and_dovecot_gets_allow(api):
    exporter, client = api
    secret = (await client.post("/api/v1/mfa/totp/enroll", json={"user": "dan"},
                                headers=ADMIN)).json()["secret"]
    attempt = {"login": "dan", "remote_ip": "198.51.100.20", "protocol": "webmail",
               "device_id": "cookie-1"}
    r = await client.post("/api/v1/security/check", json=attempt, headers=ADMIN)
    assert r.json()["action"] == "allow"  # TOTP not confirmed yet: nothing to ask for
    await client.post("/api/v1/mfa/totp/verify", json={
        "user": "dan", "code": pyotp.TOTP(secret).now(), "remote_ip": "198.51.100.20",
        "device_id": "cookie-1"}, headers=ADMIN)
    r = await client.post("/api/v1/security/check", json=attempt, headers=ADMIN)
    assert r.json()["action"] == "allow"  # remembered device and network
    r = await client.post("/api/v1/security/check", json={**attempt, "device_id": "cookie-2"},
                          headers=ADMIN)
    assert r.json()["action"] == "mfa_required" and r.json()["reason"] == "new_device"
    r = await client.post("/api/v1/security/check",
                          json={**attempt, "remote_ip": "203.0.113.9"}, headers=ADMIN)
    assert r.json()["action"] == "mfa_required" and r.json()["reason"] == "new_source"
    dovecot = {"login": "dan", "remote": "203.0.113.9", "protocol": "imap"}
    r = await client.post("/dovecot/policy?command=allow", json=dovecot)
    assert r.json() == {"status": 0, "msg": ""}  # dovecot_action: allow
    text = (await client.get("/metrics")).text
    assert metric_value(text, "a3mailer_security_decisions_total", action="mfa_required",
                        reason="new_source") == 2  # the check and Dovecot's


async def test_dovecot_action_reject_refuses_with_the_message(serve, tmp_path):  # noqa: F811
    exporter, client = await serve(mfa_config(tmp_path, policy={"dovecot_action": "reject"}))
    secret = (await client.post("/api/v1/mfa/totp/enroll", json={"user": "eve"},
                                headers=ADMIN)).json()["secret"]
    await client.post("/api/v1/mfa/totp/verify", json={
        "user": "eve", "code": pyotp.TOTP(secret).now(), "remote_ip": "198.51.100.30"},
        headers=ADMIN)
    known = await client.post("/dovecot/policy?command=allow",
                              json={"login": "eve", "remote": "198.51.100.30"})
    assert known.json() == {"status": 0, "msg": ""}  # MFA passed on the web from there
    r = await client.post("/dovecot/policy?command=allow",
                          json={"login": "eve", "remote": "203.0.113.10"})
    assert r.json()["status"] == -1 and r.json()["msg"].startswith("Second factor required")


async def test_reload_applies_the_policy_and_audit_flags_decide_the_records(serve, tmp_path):  # noqa: F811
    import yaml

    exporter, client = await serve(mfa_config(tmp_path))
    secret = (await client.post("/api/v1/mfa/totp/enroll", json={"user": "fay"},
                                headers=ADMIN)).json()["secret"]
    await client.post("/api/v1/mfa/totp/verify", json={
        "user": "fay", "code": pyotp.TOTP(secret).now()}, headers=ADMIN)
    r = await client.post("/dovecot/policy?command=allow",
                          json={"login": "fay", "remote": "203.0.113.11"})
    assert r.json()["status"] == 0
    data = yaml.safe_load(exporter.config.path.read_text())
    data["security"]["mfa"]["policy"] = {"dovecot_action": "reject"}
    data["security"]["audit_config"] = {"log_failed_auth": False}
    exporter.config.path.write_text(yaml.safe_dump(data))
    assert (await client.post("/-/reload", headers=ADMIN)).status_code == 200
    r = await client.post("/dovecot/policy?command=allow",
                          json={"login": "fay", "remote": "203.0.113.11"})
    assert r.json()["status"] == -1
    await client.post("/api/v1/mfa/totp/verify", json={"user": "fay", "code": "000000"},
                      headers=ADMIN)
    records = (await client.get("/api/v1/security/audit?limit=1000", headers=ADMIN)).json()
    types = [record["type"] for record in records["records"]]
    assert "mfa.verify.success" in types and "mfa.totp.enroll" in types
    assert "mfa.verify.failure" not in types  # log_failed_auth: false


async def test_the_audit_log_names_the_api_key_that_made_each_mfa_change(api):
    """Enrol, recovery codes, removal and reset said actor=admin, verifications api,
    whoever called; a key's changes must be traceable to the key."""
    _, client = api
    created = (await client.post("/api/v1/apikeys", json={
        "name": "web", "scopes": ["security:write", "security:read"]}, headers=ADMIN)).json()
    key = {"authorization": f"Bearer {created['key']}"}
    user = "gus@example.org"
    secret = (await client.post("/api/v1/mfa/totp/enroll", json={"user": user},
                                headers=key)).json()["secret"]
    for code in (pyotp.TOTP(secret).now(), "000000"):  # a success (it confirms), a failure
        await client.post("/api/v1/mfa/totp/verify", json={"user": user, "code": code},
                          headers=key)
    await client.post("/api/v1/mfa/recovery/regenerate", json={"user": user}, headers=key)
    assert (await client.delete(f"/api/v1/mfa/users/{user}", headers=key)).status_code == 200
    await client.post("/api/v1/mfa/totp/enroll", json={"user": user}, headers=key)
    removed = await client.delete(f"/api/v1/mfa/users/{user}/totp", headers=key)
    assert removed.status_code == 200
    records = (await client.get("/api/v1/security/audit?limit=1000&type=mfa.",
                                headers=ADMIN)).json()["records"]
    actors = {r["type"]: r["actor"] for r in records if r["subject"] == user}
    assert set(actors) == {"mfa.totp.enroll", "mfa.verify.success", "mfa.verify.failure",
                           "mfa.totp.confirm", "mfa.recovery.generate", "mfa.totp.remove",
                           "mfa.reset"}, actors
    assert set(actors.values()) == {f"apikey:{created['id']}"}, actors
