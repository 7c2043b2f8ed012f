"""Dependency faults under load: Redis killed and restarted, the state dir's filesystem
full, probe targets that refuse, hang or reset, the OTLP receiver and Alertmanager gone
and back. The exporter keeps serving, says what is wrong, and recovers by itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.exporter_process import ROOT, ExporterProcess
from tests.integration.components import (
    Alertmanager,
    OTLPReceiver,
    require_root,
    wait_until,
)
from tests.reliability.conftest import scale
from tests.reliability.test_crash import ADMIN, security_config

OUTAGE_SECONDS = scale(2.0, 20.0)
FAST_HEALTH = {"health_check_interval": "1s", "health_check_timeout": "1s",
               "failure_threshold": 1}


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class PolicyLoad:
    """Dovecot policy requests from a thread; counts answers by HTTP status and action."""

    def __init__(self, url: str):
        self.url, self.stop = url, threading.Event()
        self.statuses: dict[int, int] = {}
        self.slowest = 0.0  # seconds, the longest answer
        self.transport_errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = {"login": f"load{i % 50}", "remote": f"198.18.{i % 200}.{i % 250}",
                        "pwhash": f"{i:08x}", "protocol": "imap"}
                start = time.monotonic()
                try:
                    r = client.post("/dovecot/policy?command=allow", json=body)
                except httpx.HTTPError:
                    self.transport_errors += 1
                    continue
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

    def answered(self) -> int:
        return sum(self.statuses.values())

    def __enter__(self) -> PolicyLoad:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def check(url: str, login: str, ip: str) -> dict:
    return httpx.post(url + "/api/v1/security/check", headers=ADMIN, timeout=10,
                      json={"login": login, "remote_ip": ip}).json()


def fail(url: str, login: str, ip: str, n: int) -> list[str]:
    actions: list[str] = []
    for i in range(n):
        r = httpx.post(url + "/api/v1/security/report", headers=ADMIN, timeout=10, json={
            "login": login, "remote_ip": ip, "pwhash": f"x{i}", "success": False})
        actions += r.json()["actions"]
    return actions


@pytest.mark.parametrize("fail_open", [True, False])
def test_redis_killed_and_restarted_mid_load(tmp_path, config_file, redis_server, fail_open,
                                             record):
    config = security_config(tmp_path, type="redis", redis_url=redis_server.url,
                             fail_open=fail_open)
    config["monitoring"] = FAST_HEALTH
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, config_file(config)).start()
    try:
        with PolicyLoad(proc.url) as load:
            assert fail(proc.url, "ann", "192.0.2.7", 3) == ["lock"]
            os.kill(redis_server.pid, signal.SIGKILL)  # the store vanishes mid-load
            wait_until(lambda: check(proc.url, "zed", "192.0.2.99")["reason"] ==
                       "store_unavailable", 20, "the engine to notice the dead store")
            decision = check(proc.url, "zed", "192.0.2.99")
            assert decision["action"] == ("allow" if fail_open else "reject")
            if not fail_open:  # fail-closed: the store is critical for readiness
                wait_until(lambda: httpx.get(proc.url + "/readyz").status_code == 503, 20,
                           "/readyz to turn 503")
            time.sleep(OUTAGE_SECONDS)
            ready = httpx.get(proc.url + "/readyz").status_code
            redis_server.pid = None
            redis_server.start()  # same port, empty: Redis here keeps nothing on disk
            wait_until(lambda: check(proc.url, "zed", "192.0.2.99")["reason"] == "ok", 30,
                       "the store to reconnect")
            assert fail(proc.url, "bea", "192.0.2.8", 3) == ["lock"]
            assert check(proc.url, "bea", "192.0.2.8")["reason"] == "locked"
        assert load.statuses.get(500, 0) == 0 and load.transport_errors == 0, load.statuses
        assert sum(load.statuses.values()) > 0
        assert ready == (200 if fail_open else 503)
        if fail_open:
            assert metric(proc.url, "a3mailer_security_fail_open_decisions_total") > 0
        wait_until(lambda: httpx.get(proc.url + "/readyz").status_code == 200, 20,
                   "/readyz to recover")
        assert metric(proc.url, "a3mailer_security_store_errors_total") > 0
    finally:
        assert proc.stop() == 0
    record[f"redis_outage_fail_open_{str(fail_open).lower()}"] = {
        "faults": "redis SIGKILL, restart on the same port", "outage_seconds": OUTAGE_SECONDS,
        "requests": sum(load.statuses.values()), "http_5xx": load.statuses.get(500, 0),
        "transport_errors": load.transport_errors, "recovered": True}


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for this test and always unmounted."""
    require_root("mounting a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Filler:
    """Keeps a filesystem full, as another process writing logs would: whatever space
    comes free is taken again, until release() deletes the filler file."""

    def __init__(self, directory: Path):
        self.path = directory / "filler"
        self.stop = threading.Event()
        self.fh = open(self.path, "wb")  # noqa: SIM115 - closed in release()
        self._fill()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.fh.write(b"\0" * 4096)
                self.fh.flush()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self._fill()

    def release(self) -> None:
        self.stop.set()
        self.thread.join(5)
        with contextlib.suppress(OSError):
            self.fh.close()
        self.path.unlink()


def test_state_dir_full_is_reported_and_nothing_is_corrupted(tmp_path, config_file,
                                                             small_filesystem, record):
    config = security_config(tmp_path)
    config["server"] = {"state_dir": str(small_filesystem / "state")}
    config["monitoring"] = FAST_HEALTH
    path = config_file(config)
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, path)
    proc.state_dir = small_filesystem / "state"
    proc.start()
    try:
        assert fail(proc.url, "ann", "192.0.2.7", 3) == ["lock"]
        filler = Filler(small_filesystem)
        with PolicyLoad(proc.url) as load:
            wait_until(lambda: httpx.get(proc.url + "/readyz").status_code == 503, 20,
                       "/readyz to say the state dir is full")
            reasons = httpx.get(proc.url + "/readyz").json()["reasons"]
            assert any("state_dir" in r for r in reasons), reasons
            fail(proc.url, "cid", "192.0.2.9", 3)  # cannot be written through: not promised
            filler.release()  # space returns
            wait_until(lambda: httpx.get(proc.url + "/readyz").status_code == 200, 20,
                       "/readyz to recover")
            assert fail(proc.url, "dee", "192.0.2.10", 3) == ["lock"]
        assert load.statuses.get(500, 0) == 0 and load.transport_errors == 0, load.statuses
        locked = {lock["account"] for lock in httpx.get(
            proc.url + "/api/v1/security/lockouts", headers=ADMIN).json()["lockouts"]}
        assert {"ann", "dee"} <= locked
    finally:
        assert proc.stop() == 0
    db = sqlite3.connect(small_filesystem / "state" / "security.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    verify = subprocess.run([sys.executable, "-m", "exporter", "audit", "verify",
                             "--state-dir", str(small_filesystem / "state")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    record["state_dir_full"] = {
        "faults": "4 MiB tmpfs filled under load, then freed",
        "requests": sum(load.statuses.values()), "http_5xx": load.statuses.get(500, 0),
        "sqlite_integrity": "ok", "audit_chain": "verified", "locks_lost": 0}


class BadTargets:
    """Three TCP listeners: one that is closed, one that accepts and never speaks, one that
    resets every connection."""

    def __init__(self) -> None:
        self.silent = socket.create_server(("127.0.0.1", 0))
        self.resetting = socket.create_server(("127.0.0.1", 0))
        closed = socket.create_server(("127.0.0.1", 0))
        self.closed_port = closed.getsockname()[1]
        closed.close()
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._hold, daemon=True),
                        threading.Thread(target=self._reset, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _hold(self) -> None:
        self.silent.settimeout(0.2)
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = self.silent.accept()
                self.held.append(conn)

    def _reset(self) -> None:
        self.resetting.settimeout(0.2)
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = self.resetting.accept()
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        for sock in [self.silent, self.resetting, *self.held]:
            sock.close()


def test_probe_targets_refusing_hanging_and_resetting(tmp_path, config_file, record):
    bad = BadTargets()
    probes = [
        {"name": "refusing", "protocol": "smtp", "host": "127.0.0.1", "port": bad.closed_port},
        {"name": "hanging", "protocol": "imap", "host": "127.0.0.1",
         "port": bad.silent.getsockname()[1]},
        {"name": "resetting", "protocol": "pop3", "host": "127.0.0.1",
         "port": bad.resetting.getsockname()[1]},
    ]
    for probe in probes:
        probe.update(interval="1s", timeout="1s")
    config = security_config(tmp_path)
    config["monitoring"] = {"probes": probes, **FAST_HEALTH}
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, config_file(config)).start()
    try:
        with PolicyLoad(proc.url) as load:
            def health() -> dict[str, dict]:
                report = httpx.get(proc.url + "/health", timeout=10).json()
                return {c["component"]: c for c in report["components"]}

            wait_until(lambda: all(health()[p["name"]]["status"] == "unhealthy"
                                   for p in probes), 20, "every bad target to be unhealthy")
            fds_early = metric(proc.url, "process_open_fds")
            time.sleep(scale(4.0, 60.0))  # several probe rounds against the bad targets
            fds_late = metric(proc.url, "process_open_fds")
            components = health()
        assert "refused" in components["refusing"]["message"]
        assert "timed out" in components["hanging"]["message"]
        assert "reset" in components["resetting"]["message"].lower() or (
            "closed" in components["resetting"]["message"].lower())
        for probe in probes:
            assert metric(proc.url, "a3mailer_probe_success", probe=probe["name"]) == 0
        assert httpx.get(proc.url + "/readyz").status_code == 200  # not critical
        assert fds_late <= fds_early + 5, (fds_early, fds_late)  # no leaked connections
        assert load.statuses.get(500, 0) == 0 and load.transport_errors == 0
        assert sum(load.statuses.values()) > 0
    finally:
        assert proc.stop() == 0
        bad.close()
    record["bad_probe_targets"] = {
        "faults": "probe targets refusing, hanging, resetting", "requests":
        sum(load.statuses.values()), "http_5xx": load.statuses.get(500, 0),
        "open_fds_start": fds_early, "open_fds_end": fds_late}


def test_otlp_receiver_and_alertmanager_gone_and_back(tmp_path, config_file, record):
    """Every request sampled and traced to a real OTLP receiver, a firing alert pushed to a
    real Alertmanager; both go away under load (connections refused) and come back on the
    same port. Requests never wait for either: the answer rate during the outage stays at
    least half the rate before it; spans are dropped and pushes fail, each counted; after
    it spans arrive again and Alertmanager has the alert again, with no restart."""
    receiver = OTLPReceiver()
    am = Alertmanager(tmp_path / "am")
    am.start()
    config = security_config(tmp_path, type="memory")
    config["monitoring"] = {"alert_thresholds": {"active_lockouts_threshold": 0}}
    config["alerting"] = {
        "alerts": {"A3MailerLockoutSpike": {"for": "1s"}},
        "engine": {"evaluation_interval": "1s",
                   "alertmanager": {"url": am.url, "resend_interval": "1s", "timeout": "2s"}}}
    config["tracing"] = {"enabled": True, "sampling_rate": 1.0, "otlp_endpoint": receiver.url,
                         "batch_timeout": "200ms"}
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, config_file(config)).start()
    back: OTLPReceiver | None = None

    def lockout_alert_in_alertmanager() -> bool:
        return any(a["labels"].get("alertname") == "A3MailerLockoutSpike" for a in am.alerts())

    try:
        with PolicyLoad(proc.url) as load:
            receiver.wait_for_spans(lambda s: s.name.startswith("POST"), count=20)
            assert "lock" in fail(proc.url, "alice", "192.0.2.7", 3)
            wait_until(lockout_alert_in_alertmanager, 30, "the lockout alert in Alertmanager")

            # both gone: the receiver's socket closed, Alertmanager SIGKILLed
            port = receiver.port
            receiver.stop()
            assert am.proc is not None
            am.proc.send_signal(signal.SIGKILL)
            am.proc.wait(10)
            time.sleep(1.0)  # let the first failures happen before the rate is measured
            before_rate = load.answered() / (time.monotonic() - load.started)
            dropped_at_start = metric(proc.url, "a3mailer_tracing_spans_dropped_total")
            failed_at_start = metric(proc.url, "a3mailer_alert_push_failures_total")
            answered_at_start, outage_start = load.answered(), time.monotonic()
            time.sleep(OUTAGE_SECONDS)
            outage_rate = (load.answered() - answered_at_start) / (
                time.monotonic() - outage_start)
            # every reason (a full queue as well as a failed export) in both readings
            dropped = metric(proc.url, "a3mailer_tracing_spans_dropped_total")
            export_failed = metric(proc.url, "a3mailer_tracing_spans_dropped_total",
                                   reason="export_failed")
            push_failures = metric(proc.url, "a3mailer_alert_push_failures_total",
                                   reason="unreachable")
            assert httpx.get(proc.url + "/livez", timeout=5).status_code == 200

            # both back on the same ports
            back = OTLPReceiver(port=port)
            am.start()
            recovery_start = time.monotonic()
            back.wait_for_spans(lambda s: s.name.startswith("POST"), count=20, timeout=30)
            wait_until(lockout_alert_in_alertmanager, 30, "the alert pushed again")
            recovered_in = time.monotonic() - recovery_start
        assert dropped > dropped_at_start, (dropped_at_start, dropped)
        assert export_failed > 0, export_failed
        assert push_failures > failed_at_start, (failed_at_start, push_failures)
        assert outage_rate >= 0.5 * before_rate, (before_rate, outage_rate)
        assert load.statuses.get(500, 0) == 0 and load.transport_errors == 0, load.statuses
        assert "span export failing" in proc.log()
    finally:
        assert proc.stop() == 0
        am.stop()
        receiver.stop()
        if back is not None:
            back.stop()
    record["otlp_and_alertmanager_gone"] = {
        "faults": "OTLP receiver and Alertmanager gone for the outage, then back",
        "outage_seconds": OUTAGE_SECONDS, "requests": load.answered(),
        "http_5xx": load.statuses.get(500, 0), "transport_errors": load.transport_errors,
        "requests_per_second_before": round(before_rate, 1),
        "requests_per_second_during_outage": round(outage_rate, 1),
        "slowest_answer_seconds": round(load.slowest, 3),
        "spans_dropped": dropped, "alert_push_failures": push_failures,
        "recovered_within_seconds": round(recovered_in, 1)}
