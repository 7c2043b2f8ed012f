"""A real Dovecot 2.3 asks the real exporter whether IMAP logins may proceed."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.components import imap_login as login
from tests.integration.components import next_loopback_ip, wait_until

pytestmark = pytest.mark.integration

ALICE = "alice@example.test"
REJECT = "Too many failures, try later"
# Dovecot's own per-IP penalty (2, 4, 8, 15 s) would only slow these tests down.
NO_PENALTY = "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
QUICK = {"auth_failure_delay": "0", "extra_config": NO_PENALTY}


def policy_config(config_file, **security):
    """Loopback is not trusted here: every test client is a 127.0.0.x address."""
    return config_file({"security": {
        "trusted_networks": [], "max_login_attempts": 3, "reject_message": REJECT,
        "tarpit": {"enabled": False}, **security}})


@pytest.fixture
def stack(exporter_process, dovecot_factory, config_file):
    def start(**security):
        exporter = exporter_process(policy_config(config_file, **security))
        dovecot = dovecot_factory(policy_url=f"{exporter.url}/dovecot/policy", **QUICK)
        return exporter, dovecot
    return start


def test_repeated_bad_passwords_lock_that_source_only(stack):
    exporter, dovecot = stack()
    attacker, elsewhere = next_loopback_ip(), next_loopback_ip()
    password = dovecot.users[ALICE]
    assert login(dovecot, ALICE, password, attacker) == "OK"
    for n in range(3):
        assert "Authentication failed" in login(dovecot, ALICE, f"wrong-{n}", attacker)
    # locked: even the right password is refused from that source, with our message
    assert REJECT in login(dovecot, ALICE, password, attacker)
    # the real user elsewhere is not locked out
    assert login(dovecot, ALICE, password, elsewhere) == "OK"
    metrics = httpx.get(exporter.url + "/metrics").text
    assert 'a3mailer_security_decisions_total{action="reject",reason="locked"} 1.0' in metrics
    assert 'a3mailer_security_attempts_total{protocol="imap",result="failure"} 3.0' in metrics
    assert 'a3mailer_security_active_lockouts{scope="source_account"} 1.0' in metrics
    assert ALICE not in metrics and attacker not in metrics  # never in labels


def test_one_stale_password_retried_never_locks(stack):
    _, dovecot = stack()
    phone = next_loopback_ip()
    for _ in range(6):
        assert "Authentication failed" in login(dovecot, ALICE, "old-password", phone)
    assert login(dovecot, ALICE, dovecot.users[ALICE], phone) == "OK"


def test_allowlisted_source_is_never_locked(stack):
    office = next_loopback_ip()
    _, dovecot = stack(allowlist=[office])
    for n in range(6):
        assert "Authentication failed" in login(dovecot, ALICE, f"wrong-{n}", office)
    assert login(dovecot, ALICE, dovecot.users[ALICE], office) == "OK"


def test_lock_survives_an_exporter_restart_and_admin_unlock(stack, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("adm1n-token-0123456")
    exporter, dovecot = stack(admin_token_file=str(token))
    source = next_loopback_ip()
    for n in range(3):
        login(dovecot, ALICE, f"wrong-{n}", source)
    assert REJECT in login(dovecot, ALICE, dovecot.users[ALICE], source)

    assert exporter.stop() == 0
    exporter.start()
    assert REJECT in login(dovecot, ALICE, dovecot.users[ALICE], source)

    admin = {"authorization": "Bearer adm1n-token-0123456"}
    locks = httpx.get(exporter.url + "/api/v1/security/lockouts", headers=admin).json()
    assert [(lock["account"], lock["source"]) for lock in locks["lockouts"]] == [
        (ALICE, f"{source}/32")]
    r = httpx.delete(exporter.url + f"/api/v1/security/lockouts/{ALICE}", headers=admin)
    assert r.status_code == 200
    assert login(dovecot, ALICE, dovecot.users[ALICE], source) == "OK"
    audit = httpx.get(exporter.url + "/api/v1/security/audit",
                      params={"type": "lockout."}, headers=admin).json()["records"]
    assert [r["type"] for r in audit] == ["lockout.unlock", "lockout.lock"]
    verify = httpx.get(exporter.url + "/api/v1/security/audit/verify", headers=admin)
    assert verify.status_code == 200 and verify.json()["ok"] is True


def test_endpoint_down_lets_reject_on_fail_decide(exporter_process, dovecot_factory,
                                                  config_file):
    exporter = exporter_process(policy_config(config_file))
    url = f"{exporter.url}/dovecot/policy"
    lenient = dovecot_factory(policy_url=url, policy_options={"reject_on_fail": "no"}, **QUICK)
    strict = dovecot_factory(policy_url=url, policy_options={"reject_on_fail": "yes"}, **QUICK)
    assert login(strict, ALICE, strict.users[ALICE], next_loopback_ip()) == "OK"
    exporter.stop()
    assert login(lenient, ALICE, lenient.users[ALICE], next_loopback_ip()) == "OK"
    assert login(strict, ALICE, strict.users[ALICE], next_loopback_ip()) != "OK"


def test_api_key_is_required_off_loopback_and_checked(exporter_process, dovecot_factory,
                                                      config_file, tmp_path):
    key = tmp_path / "dovecot.key"
    key.write_text("k3y-for-dovecot")
    exporter = exporter_process(policy_config(config_file, dovecot_policy={
        "api_key_file": str(key), "allow_loopback_without_key": False}))
    url = f"{exporter.url}/dovecot/policy"
    body = {"login": ALICE, "remote": "192.0.2.7", "pwhash": "ab12", "protocol": "imap"}
    assert httpx.post(url, params={"command": "allow"}, json=body).status_code == 401
    r = httpx.post(url, params={"command": "allow"}, json=body,
                   headers={"X-API-Key": "k3y-for-dovecot"})
    assert r.status_code == 200 and r.json() == {"status": 0, "msg": ""}
    dovecot = dovecot_factory(policy_url=url, policy_options={
        "server_api_header": "X-API-Key:k3y-for-dovecot", "reject_on_fail": "yes"}, **QUICK)
    assert login(dovecot, ALICE, dovecot.users[ALICE], next_loopback_ip()) == "OK"


@pytest.mark.parametrize("query, body, status", [
    ({"command": "allow"}, b"{not json", 400),
    ({"command": "allow"}, b'{"login": "a"', 400),
    ({"command": "allow"}, b'{"login": "a", "remote": "not-an-ip"}', 400),
    ({"command": "allow"}, b'{"login": 5, "remote": "192.0.2.1"}', 400),
    ({"command": "allow"}, b'["login"]', 400),
    ({"command": "allow"}, b'{"login": "\xff\xfe", "remote": "192.0.2.1"}', 400),
    ({"command": "report"}, b'{"login": "a\\ud800b", "remote": "192.0.2.1", "success": false}',
     400),  # a lone surrogate: valid JSON, but SQLite's flush could never write it
    ({"command": "allow"}, b'{"login": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    ({"command": "report"}, b'{"login": "a", "remote": "192.0.2.1"}', 400),
    ({"command": "drop"}, b'{"login": "a", "remote": "192.0.2.1"}', 400),
    ({"command": "allow"}, b'{"login": "' + b"x" * 2_000_000 + b'"}', 413),
])
def test_malformed_requests_get_errors_and_the_process_keeps_serving(
        exporter_process, config_file, query, body, status):
    exporter = exporter_process(policy_config(config_file))
    url = f"{exporter.url}/dovecot/policy"
    r = httpx.post(url, params=query, content=body)
    assert r.status_code == status
    assert r.json()["error"] in {"bad_request", "payload_too_large"}
    ok = httpx.post(url, params={"command": "allow"},
                    json={"login": ALICE, "remote": "192.0.2.1"})
    assert ok.json() == {"status": 0, "msg": ""}
    wait_until(lambda: "bad_request" in httpx.get(exporter.url + "/metrics").text
               or status == 413, 5, "the bad request counted")
