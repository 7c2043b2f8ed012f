"""After a full run (real Dovecot logins through the policy endpoint, webhooks, the admin
API, failed and successful logins, a lock, a ban) no secret, password, token, user name
or client address appears in /metrics or in the exporter's log. (TLS on the listener with
a test certificate: tests/integration/test_exporter_process.py.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx

from tests.exporter_process import ExporterProcess
from tests.integration.components import next_loopback_ip
from tests.integration.test_dovecot_policy import ALICE, QUICK, login

ADMIN_TOKEN = "adm1n-T0ken-never-logged"
DOVECOT_KEY = "d0vecot-Key-never-logged"
WEBHOOK_SECRET = "w3bhook-Secret-never-logged"
WRONG_PASSWORDS = ["Wr0ng-pass-one", "Wr0ng-pass-two", "Wr0ng-pass-three"]


def test_no_secret_or_personal_data_in_metrics_or_logs(tmp_path, config_file, dovecot_factory):
    secrets = {}
    for name, value in (("admin", ADMIN_TOKEN), ("dovecot", DOVECOT_KEY),
                        ("webhook", WEBHOOK_SECRET)):
        secrets[name] = tmp_path / f"{name}.secret"
        secrets[name].write_text(value)
    config = config_file({
        "logging": {"level": "debug"},
        "security": {
            "admin_token_file": str(secrets["admin"]), "trusted_networks": [],
            "max_login_attempts": 3, "tarpit": {"enabled": False},
            "dovecot_policy": {"api_key_file": str(secrets["dovecot"]),
                               "allow_loopback_without_key": False},
            "stalwart_webhook": {"secret_file": str(secrets["webhook"])}}})
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, config).start()
    client = httpx.Client(base_url=proc.url, timeout=10)
    attacker, user_ip, webhook_ip = next_loopback_ip(), next_loopback_ip(), "203.0.113.77"
    try:
        dovecot = dovecot_factory(policy_url=f"{proc.url}/dovecot/policy", policy_options={
            "server_api_header": f"X-API-Key:{DOVECOT_KEY}"}, **QUICK)
        password = dovecot.users[ALICE]
        assert login(dovecot, ALICE, password, user_ip) == "OK"
        for wrong in WRONG_PASSWORDS:
            login(dovecot, ALICE, wrong, attacker)
        assert "Authentication failed" not in login(dovecot, ALICE, password, attacker)
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        assert client.post("/api/v1/security/blocklist", headers=admin,
                           json={"network": "198.51.100.0/24"}).status_code == 201
        assert client.get("/api/v1/security/lockouts", headers=admin).json()["lockouts"]
        assert client.post("/api/v1/security/check", headers={
            "authorization": "Bearer not-the-token"}, json={}).status_code == 401
        body = json.dumps({"events": [{"id": "e1", "createdAt": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "type": "auth.failed", "data": {
            "accountName": "carol@example.test", "remoteIp": webhook_ip}}]}).encode()
        signature = base64.b64encode(hmac.new(WEBHOOK_SECRET.encode(), body,
                                              hashlib.sha256).digest()).decode()
        assert client.post("/api/v1/webhooks/stalwart", content=body, headers={
            "x-signature": signature, "content-type": "application/json"}).status_code == 200
        metrics = client.get("/metrics").text + client.get(
            "/metrics", headers={"accept": "application/openmetrics-text"}).text
    finally:
        client.close()
        assert proc.stop() == 0
    log = proc.log()
    assert "a3mailer_security_attempts_total" in metrics and "level=" in log  # both real
    forbidden = {
        "admin token": ADMIN_TOKEN, "Dovecot API key": DOVECOT_KEY,
        "webhook secret": WEBHOOK_SECRET, "the user's password": password,
        **{f"wrong password {n}": p for n, p in enumerate(WRONG_PASSWORDS)},
        "user name": "alice", "webhook user": "carol", "attacker address": attacker,
        "user address": user_ip, "webhook address": webhook_ip,
    }
    for what, text in forbidden.items():
        assert text not in metrics, f"{what} in /metrics"
        assert text not in log, f"{what} in the exporter log"
