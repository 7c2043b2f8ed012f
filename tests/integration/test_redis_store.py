"""Several exporter processes sharing one real Redis."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.components import wait_until

pytestmark = pytest.mark.integration

TOKEN = "redis-admin-token-0123"
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


def test_a_replica_starts_while_redis_is_down_answers_503_and_catches_up(
        exporter_process, config_file, tmp_path):
    """It used to exit at start with a traceback (a pod rescheduled during a Redis outage
    crash-looped); the admin and identity routes answered 500 (plain text for an API key)."""
    from tests.integration.components import Redis
    from tests.integration.test_security_api import event, signed

    late = Redis(tmp_path / "late")  # its port is chosen; it starts later
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    (tmp_path / "webhook.key").write_bytes(b"hmac-key")
    exporter = exporter_process(config_file({"security": {
        "admin_token_file": str(token), "trusted_networks": [],
        "stalwart_webhook": {"secret_file": str(tmp_path / "webhook.key")},
        "store": {"type": "redis", "redis_url": late.url, "fail_open": True}}}))
    try:
        assert decide(exporter, "ivy", "192.0.2.30")["reason"] == "store_unavailable"
        for path in ("/api/v1/security/lockouts", "/api/v1/apikeys"):
            r = httpx.get(exporter.url + path, headers=ADMIN)
            assert (r.status_code, r.json()["error"]) == (503, "store_unavailable"), path
            assert r.headers["retry-after"] == "5"
        r = httpx.get(exporter.url + "/api/v1/apikeys",
                      headers={"authorization": "Bearer a3m_0123456789ab_" + "x" * 43})
        assert (r.status_code, r.headers["content-type"]) == (503, "application/json")
        # a webhook batch refused meanwhile is taken when Stalwart sends it again
        body, headers = signed(b"hmac-key", [event("retry-1", "auth.failed",
                                                   accountName="ivy", remoteIp="192.0.2.31")])
        url = exporter.url + "/api/v1/webhooks/stalwart"
        assert httpx.post(url, content=body, headers=headers).status_code == 503
        late.start()
        wait_until(lambda: decide(exporter, "ivy", "192.0.2.30")["reason"] == "ok", 15,
                   "the first connection")
        assert httpx.post(url, content=body, headers=headers).json() == {
            "accepted": 1, "skipped": 0, "ignored": 0}
        assert httpx.post(url, content=body, headers=headers).json()["skipped"] == 1
        metrics = httpx.get(exporter.url + "/metrics").text
        assert 'a3mailer_security_store_errors_total{operation="api"}' in metrics
        assert "Traceback" not in exporter.log()
    finally:
        late.stop()


def test_malformed_bans_and_locks_in_redis_are_skipped_not_fatal(replica, redis_server):
    """One hand-edited ban stopped every replica from starting and bans from spreading;
    one hand-edited lock made every unlock answer 400 or 500."""
    import redis

    raw = redis.Redis.from_url(redis_server.url)
    raw.hset("a3m:bans", "10.9.9.9/32", "not json")
    raw.set("a3m:lock:a:mallory", '{"until": "soon"}')
    raw.sadd("a3m:locks", "a:mallory")
    raw.set("a3m:lock:a:trent", "garbage")
    raw.sadd("a3m:locks", "a:trent")
    a, b = replica(), replica()  # both start
    for n in range(1, 4):
        report(a, "gina", "192.0.2.20", f"h{n}")
    assert decide(b, "gina", "192.0.2.20")["reason"] == "locked"
    assert decide(a, "mallory", "192.0.2.21")["action"] == "allow"  # no lock, no 500
    assert decide(a, "trent", "192.0.2.21")["reason"] == "ok"
    r = httpx.get(a.url + "/api/v1/security/lockouts", headers=ADMIN)
    assert r.status_code == 200
    assert [lock["account"] for lock in r.json()["lockouts"]] == ["gina"]
    assert httpx.delete(b.url + "/api/v1/security/lockouts/gina", headers=ADMIN
                        ).status_code == 200
    assert decide(a, "gina", "192.0.2.20")["action"] == "allow"
    assert httpx.post(a.url + "/api/v1/security/blocklist", headers=ADMIN, json={
        "network": "203.0.113.0/24", "reason": "abuse"}).status_code == 201
    bans = httpx.get(a.url + "/api/v1/security/blocklist", headers=ADMIN)
    assert bans.status_code == 200
    assert [ban["network"] for ban in bans.json()["bans"]] == ["203.0.113.0/24"]
    wait_until(lambda: decide(b, "hank", "203.0.113.5")["reason"] == "banned", 15,
               "the ban to spread")
    assert "skipping a malformed ban in Redis" in a.log()
