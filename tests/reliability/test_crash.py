"""SIGKILL the exporter under load and restart it on the same state: every lock and ban a
client was told about is still there, and the audit chain verifies. With the Redis store,
one of two replicas is killed: the other keeps enforcing, the restarted one agrees."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest

from tests.exporter_process import ROOT, ExporterProcess
from tests.reliability.conftest import scale

TOKEN = "crash-admin-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
LOAD_SECONDS = scale(4.0, 30.0)


def security_config(tmp_path: Path, **store: Any) -> dict[str, Any]:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    mfa_key = tmp_path / "mfa.key"  # replicas on one Redis share it
    mfa_key.write_text("crash-test-mfa-key-material-0123456789abcdef")
    return {"security": {
        "admin_token_file": str(token), "trusted_networks": [], "max_login_attempts": 3,
        "tarpit": {"enabled": False}, "auto_ban": {"threshold": 6},
        "enable_rate_limiting": False, "store": store or {"type": "sqlite"},
        "mfa": {"encryption_key_file": str(mfa_key)}}}


class Load:
    """Threads reporting failed logins through the admin API: each thread works through its
    own accounts and addresses, so some reports lock an account+source and some ban a
    source. Every answer that says "lock" or "ban" is remembered: it was promised."""

    def __init__(self, url: str, threads: int = 3):
        self.url = url
        self.stop = threading.Event()
        self.locked: set[tuple[str, str]] = set()  # (account, address) promised locked
        self.banned: set[str] = set()  # addresses promised banned
        self.requests = self.errors = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(threads)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        client = httpx.Client(base_url=self.url, headers=ADMIN, timeout=5)
        i = 0
        while not self.stop.is_set():
            i += 1
            # one address per 8 reports (2 accounts x 4 passwords: a lock each, then a ban)
            address = f"198.51.{n}.{i // 8 % 250 + 1}" if i < 16000 else f"203.0.{n}.{i % 250}"
            account = f"user{n}-{i // 4}"
            body = {"login": account, "remote_ip": address, "pwhash": f"h{i}",
                    "protocol": "imap", "success": False}
            try:
                r = client.post("/api/v1/security/report", json=body)
            except httpx.HTTPError:
                if not self.stop.is_set():
                    with self._lock:
                        self.errors += 1
                continue
            with self._lock:
                self.requests += 1
                if r.status_code != 200:
                    self.errors += 1
                    continue
                actions = r.json()["actions"]
                if "lock" in actions:
                    self.locked.add((account, f"{address}/32"))
                if "ban" in actions:
                    self.banned.add(f"{address}/32")
        client.close()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def state(url: str) -> tuple[set[tuple[str, str]], set[str]]:
    locks = httpx.get(url + "/api/v1/security/lockouts", headers=ADMIN, timeout=10).json()
    bans = httpx.get(url + "/api/v1/security/blocklist", headers=ADMIN, timeout=10).json()
    return ({(lock["account"], lock["source"]) for lock in locks["lockouts"]},
            {ban["network"] for ban in bans["bans"]})


def kill(proc: ExporterProcess) -> None:
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    proc.stop()  # closes the log; the process is gone already


def run_until(load: Load, predicate: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or not predicate():
        assert time.monotonic() < deadline + 30, "the load never made enough locks and bans"
        time.sleep(0.1)


class Identity:
    """An API key, a web session and a TOTP enrolment whose last code was accepted: what
    must survive the crash besides locks and bans."""

    def __init__(self, url: str):
        r = httpx.post(url + "/api/v1/apikeys", headers=ADMIN, timeout=10,
                       json={"name": "crash-test", "scopes": ["security:read"]})
        assert r.status_code == 201, r.text
        self.key = r.json()["key"]
        r = httpx.post(url + "/api/v1/sessions", headers=ADMIN, json={"user": "dana"},
                       timeout=10)
        assert r.status_code == 201, r.text
        self.session = r.json()["session_id"]
        r = httpx.post(url + "/api/v1/mfa/totp/enroll", headers=ADMIN, json={"user": "dana"},
                       timeout=10)
        assert r.status_code == 200, r.text
        self.totp = pyotp.TOTP(r.json()["secret"])
        self.code = self.totp.now()
        self.last_code = ""
        assert self.verify(url)["valid"] is True

    def verify(self, url: str, code: str | None = None) -> dict[str, Any]:
        return httpx.post(url + "/api/v1/mfa/totp/verify", headers=ADMIN, timeout=10,
                          json={"user": "dana", "code": code or self.code}).json()

    def accept_last(self, url: str) -> None:
        """Just before the kill: a code of the next time step (inside the one-step skew) is
        accepted, so its step is most likely in the MFA journal only, not yet committed to
        SQLite by a flush."""
        self.last_code = self.totp.at(time.time() + self.totp.interval)
        assert self.verify(url, self.last_code)["valid"] is True

    def intact(self, url: str) -> dict[str, bool]:
        key = httpx.get(url + "/api/v1/security/lockouts", timeout=10,
                        headers={"authorization": f"Bearer {self.key}"}).status_code == 200
        session = httpx.get(f"{url}/api/v1/sessions/{self.session}", headers=ADMIN,
                            timeout=10).status_code == 200
        replay = self.verify(url)
        kept = {"api_key": key, "session": session,
                "totp_replay_refused": replay["valid"] is False
                and replay.get("reason") == "replayed"}
        if self.last_code:
            late = self.verify(url, self.last_code)
            kept["totp_last_replay_refused"] = (late["valid"] is False
                                                and late.get("reason") == "replayed")
        return kept


def test_sigkill_under_load_loses_no_lock_ban_or_audit_record(tmp_path, config_file, record):
    path = config_file(security_config(tmp_path))
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, path).start()
    manual = httpx.post(proc.url + "/api/v1/security/blocklist", headers=ADMIN,
                        json={"network": "192.0.2.0/24", "reason": "manual, before the crash"})
    assert manual.status_code == 201
    identity = Identity(proc.url)
    load = Load(proc.url).start()
    run_until(load, lambda: len(load.locked) >= 3 and len(load.banned) >= 1, LOAD_SECONDS)
    identity.accept_last(proc.url)
    kill(proc)  # mid-load: requests are in flight
    load.finish()
    promised_locks, promised_bans = set(load.locked), set(load.banned) | {"192.0.2.0/24"}

    restarted = ExporterProcess(workdir, path, port=proc.port).start()
    try:
        locks, bans = state(restarted.url)
        assert promised_locks <= locks, promised_locks - locks
        assert promised_bans <= bans, promised_bans - bans
        # the engine enforces them at once, not only lists them
        account, source = sorted(promised_locks)[0]
        check = httpx.post(restarted.url + "/api/v1/security/check", headers=ADMIN, json={
            "login": account, "remote_ip": source.removesuffix("/32")}).json()
        assert check["action"] == "reject" and check["reason"] in ("locked", "banned")
        verify = httpx.get(restarted.url + "/api/v1/security/audit/verify", headers=ADMIN)
        assert verify.status_code == 200, verify.text
        kept = identity.intact(restarted.url)
        assert all(kept.values()), kept
    finally:
        assert restarted.stop() == 0
    offline = subprocess.run([sys.executable, "-m", "exporter", "audit", "verify",
                              "--state-dir", str(workdir / "state")], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    record["crash_sqlite"] = {
        "load_seconds": LOAD_SECONDS, "requests": load.requests, "errors_at_kill":
        load.errors, "faults": "SIGKILL under load", "locks_promised": len(promised_locks),
        "bans_promised": len(promised_bans), "locks_lost": len(promised_locks - locks),
        "bans_lost": len(promised_bans - bans), "audit_chain": "verified",
        **{f"{name}_intact": ok for name, ok in kept.items()}}


@pytest.fixture
def redis_replicas(tmp_path, config_file, redis_server):
    path = config_file(security_config(tmp_path, type="redis", redis_url=redis_server.url))
    started: list[ExporterProcess] = []

    def start(name: str, port: int | None = None) -> ExporterProcess:
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        proc = ExporterProcess(workdir, path, port=port)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def test_sigkill_one_of_two_redis_replicas(redis_replicas, record):
    a, b = redis_replicas("a"), redis_replicas("b")
    identity = Identity(a.url)
    load = Load(a.url).start()
    run_until(load, lambda: len(load.locked) >= 3 and len(load.banned) >= 1, LOAD_SECONDS)
    kill(a)
    load.finish()
    promised_locks, promised_bans = set(load.locked), set(load.banned)
    # the survivor enforces what the dead replica promised
    locks, bans = state(b.url)
    assert promised_locks <= locks and promised_bans <= bans
    account, source = sorted(promised_locks)[0]
    check = httpx.post(b.url + "/api/v1/security/check", headers=ADMIN, json={
        "login": account, "remote_ip": source.removesuffix("/32")}).json()
    assert check["action"] == "reject"
    kept = identity.intact(b.url)  # the survivor honours what the dead replica created
    assert all(kept.values()), kept
    restarted = redis_replicas("a", port=a.port)
    assert state(restarted.url) == state(b.url)
    record["crash_redis"] = {
        "load_seconds": LOAD_SECONDS, "requests": load.requests, "faults":
        "SIGKILL of one of two replicas", "locks_promised": len(promised_locks),
        "bans_promised": len(promised_bans), "locks_lost": len(promised_locks - locks),
        "bans_lost": len(promised_bans - bans),
        **{f"{name}_intact": ok for name, ok in kept.items()}}
