"""Several exporter processes sharing one real Redis."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.components import wait_until

pytestmark = pytest.mark.integration

TOKEN = "redis-admin"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


def attempt(login: str, ip: str, pwhash: str, **extra) -> dict:
    return {"login": login, "remote_ip": ip, "pwhash": pwhash, "protocol": "imap", **extra}


@pytest.fixture
def replica(exporter_process, config_file, tmp_path, redis_server):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    count = iter(range(100))

    def start(**store):
        config = config_file({"security": {
            "admin_token_file": str(token), "trusted_networks": [], "max_login_attempts": 3,
            "tarpit": {"enabled": False},
            "store": {"type": "redis", "redis_url": redis_server.url, **store}}},
            name=f"replica{next(count)}.yaml")
        return exporter_process(config)
    return start


def decide(exporter, login: str, ip: str) -> dict:
    r = httpx.post(exporter.url + "/api/v1/security/check", json=attempt(login, ip, ""),
                   headers=ADMIN)
    return r.json()


def report(exporter, login: str, ip: str, pwhash: str, success: bool = False) -> dict:
    r = httpx.post(exporter.url + "/api/v1/security/report",
                   json=attempt(login, ip, pwhash, success=success), headers=ADMIN)
    return r.json()


def test_a_lock_made_through_one_replica_is_enforced_by_the_other(replica):
    a, b = replica(), replica()
    # failures spread over both replicas add up in the shared store
    report(a, "gina", "192.0.2.20", "h1")
    report(b, "gina", "192.0.2.20", "h2")
    assert report(a, "gina", "192.0.2.20", "h3")["actions"] == ["lock"]
    assert decide(b, "gina", "192.0.2.20")["reason"] == "locked"
    assert decide(b, "gina", "192.0.2.21")["action"] == "allow"
    locks = httpx.get(b.url + "/api/v1/security/lockouts", headers=ADMIN).json()["lockouts"]
    assert [(lock["account"], lock["source"]) for lock in locks] == [("gina", "192.0.2.20/32")]
    # unlocking through b frees the account on a
    assert httpx.delete(b.url + "/api/v1/security/lockouts/gina", headers=ADMIN
                        ).status_code == 200
    assert decide(a, "gina", "192.0.2.20")["action"] == "allow"


def test_a_ban_reaches_the_other_replica(replica):
    a, b = replica(), replica()
    r = httpx.post(a.url + "/api/v1/security/blocklist", headers=ADMIN,
                   json={"network": "203.0.113.0/24", "reason": "abuse"})
    assert r.status_code == 201
    assert decide(a, "hank", "203.0.113.5")["reason"] == "banned"
    wait_until(lambda: decide(b, "hank", "203.0.113.5")["reason"] == "banned", 15,
               "replica b to load the ban")  # within the 5 s maintenance interval


def test_redis_down_fails_open_or_closed_then_reconnects(replica, redis_server):
    open_ = replica(fail_open=True)
    closed = replica(fail_open=False)
    redis_server.stop()
    assert decide(open_, "ivy", "192.0.2.30") == {
        "action": "allow", "reason": "store_unavailable", "delay": 0.0, "message": "",
        "retry_after": 0.0}
    assert decide(closed, "ivy", "192.0.2.30")["action"] == "reject"
    assert decide(closed, "ivy", "192.0.2.30")["reason"] == "store_unavailable"
    metrics = httpx.get(open_.url + "/metrics").text
    assert "a3mailer_security_fail_open_decisions_total 1.0" in metrics
    assert 'a3mailer_security_store_errors_total{operation="check"}' in metrics
    redis_server.start()  # same port: the replicas reconnect by themselves
    wait_until(lambda: decide(closed, "ivy", "192.0.2.30")["action"] == "allow", 15,
               "the reconnect")
    assert decide(open_, "ivy", "192.0.2.30")["reason"] == "ok"
