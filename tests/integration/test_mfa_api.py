"""The MFA API of the real exporter process: TOTP replay state survives a restart (SQLite)
and is shared by two replicas on one Redis; the generated key file is kept."""

from __future__ import annotations

import stat

import httpx
import pyotp
import pytest

pytestmark = pytest.mark.integration

TOKEN = "mfa-admin-token-0123"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


def config(config_file, tmp_path, name: str = "config.yaml", **security):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    return config_file({"security": {"admin_token_file": str(token), **security}}, name=name)


def enroll(url: str, user: str) -> str:
    r = httpx.post(url + "/api/v1/mfa/totp/enroll", json={"user": user}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["secret"]


def verify(url: str, user: str, code: str) -> dict:
    r = httpx.post(url + "/api/v1/mfa/totp/verify", json={"user": user, "code": code},
                   headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def test_replay_state_and_secrets_survive_a_restart(exporter_process, config_file, tmp_path):
    exporter = exporter_process(config(config_file, tmp_path))
    assert httpx.post(exporter.url + "/api/v1/mfa/totp/enroll",
                      json={"user": "alice"}).status_code == 401
    secret = enroll(exporter.url, "alice")
    code = pyotp.TOTP(secret).now()
    assert verify(exporter.url, "alice", code)["valid"] is True
    key = exporter.state_dir / "mfa.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert secret not in (exporter.state_dir / "security.db").read_bytes().decode(
        "latin-1")
    assert exporter.stop() == 0
    exporter.start()
    assert verify(exporter.url, "alice", code) == {"valid": False, "method": "totp",
                                                   "reason": "replayed"}
    status = httpx.get(exporter.url + "/api/v1/mfa/users/alice", headers=ADMIN).json()
    assert status["totp"]["confirmed"] is True
    metrics = httpx.get(exporter.url + "/metrics").text
    assert 'a3mailer_mfa_verifications_total{method="totp",result="replayed"} 1.0' in metrics
    assert code not in exporter.log() and secret not in exporter.log()


def test_two_replicas_on_redis_share_enrolment_and_replay_state(
        exporter_process, config_file, tmp_path, redis_server):
    key = tmp_path / "shared-mfa.key"
    key.write_text("a-shared-key-for-every-replica-0123456789\n")
    shared = {"store": {"type": "redis", "redis_url": redis_server.url},
              "mfa": {"encryption_key_file": str(key)}}
    one = exporter_process(config(config_file, tmp_path, "one.yaml", **shared))
    two = exporter_process(config(config_file, tmp_path, "two.yaml", **shared))
    secret = enroll(one.url, "bob")
    code = pyotp.TOTP(secret).now()
    assert verify(two.url, "bob", code)["valid"] is True
    assert verify(one.url, "bob", code)["reason"] == "replayed"
    assert verify(two.url, "bob", code)["reason"] == "replayed"
