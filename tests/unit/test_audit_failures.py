"""A failing audit log on the login path: the login goes on, and the log says so without
flooding (a full disk fails every login's record)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from security import engine as engine_module
from security.attempts import Attempt, Decision
from security.audit import AuditLog
from security.engine import AuditFailureLog, SecurityManager, record_audit
from security.identity import audit_verification
from security.settings import Settings
from security.store.memory import MemoryStore
from tests.unit.test_security_engine import BASE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def closed_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[AuditLog, AuditFailureLog]:
    """An audit log whose every record() raises, and the failure log counting them."""
    failures = AuditFailureLog()
    monkeypatch.setattr(engine_module, "AUDIT_FAILURES", failures)
    audit = AuditLog(tmp_path / "audit")
    audit.close()
    return audit, failures


def fail(failures: AuditFailureLog, n: int) -> None:
    for _ in range(n):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            failures.failure("auth.failure")


def test_failures_are_logged_once_per_interval_with_the_count(caplog: pytest.LogCaptureFixture):
    clock = Clock()
    failures = AuditFailureLog(interval=60.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="security.engine"):
        fail(failures, 1000)
        assert len(caplog.records) == 1
        first = caplog.records[0]
        assert first.exc_info is not None and "No space left" in str(first.exc_info[1])
        assert (first.failed_since_last_report, first.failed_total) == (1, 1)  # type: ignore[attr-defined]
        clock.now += 59.9
        fail(failures, 1)
        assert len(caplog.records) == 1
        clock.now += 0.2
        fail(failures, 1)
        assert len(caplog.records) == 2
        second = caplog.records[1]
        assert (second.failed_since_last_report, second.failed_total) == (1001, 1002)  # type: ignore[attr-defined]
    assert failures.failed == 1002


async def test_a_closed_audit_log_does_not_fail_logins(
        closed_log: tuple[AuditLog, AuditFailureLog], caplog: pytest.LogCaptureFixture):
    audit, failures = closed_log
    engine = SecurityManager(Settings(**BASE), MemoryStore(), audit)
    attempt = Attempt("alice@example.org", "192.0.2.1", "imap", True, "s1", "ab12")
    assert await engine.check(attempt) == Decision("allow", "ok")
    with caplog.at_level(logging.ERROR, logger="security.engine"):
        for n in range(5):  # five distinct wrong passwords: max_login_attempts is 3
            await engine.report(Attempt("alice@example.org", "192.0.2.1", "imap", True,
                                        f"s{n}", f"bad{n}"), False)
        audit_verification(audit, "oidc", True, "alice")  # the identity routes' path
    # 5 auth.failure, 1 lockout.lock, 1 auth.success (oidc): all refused, none raised
    assert failures.failed == 7
    assert len([r for r in caplog.records if "audit record failed" in r.getMessage()]) == 1
    # the engine counted the failures all the same: the pair is locked
    assert (await engine.check(attempt)).reason == "locked"


def test_record_audit_without_a_log_is_a_no_op():
    record_audit(None, "auth.success", "engine", "alice", {})


async def test_password_checks_and_history_changes_go_on_without_an_audit_log(
        closed_log: tuple[AuditLog, AuditFailureLog]):
    from security.passwords import PasswordPolicy, PasswordSettings

    audit, failures = closed_log
    store = MemoryStore()
    policy = PasswordPolicy(PasswordSettings(history_size=3), store, audit)
    assert (await policy.check("correct horse battery staple 1987", "bob")).accepted
    assert await policy.remember("bob", "correct horse battery staple 1987") == 1
    # the change the caller was told about is the one the store holds
    result = await policy.check("correct horse battery staple 1987", "bob")
    assert not result.accepted and "reused" in result.reasons
    assert await policy.forget("bob") is True
    assert failures.failed == 4  # accepted, history, rejected, history: none raised


def test_lost_audit_records_are_a_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from exporter.collectors import security as collector_module
    from exporter.collectors.security import SecurityCollector
    from exporter.instruments import CounterVec

    failures = AuditFailureLog()
    fail(failures, 3)
    monkeypatch.setattr(collector_module, "AUDIT_FAILURES", failures)
    with AuditLog(tmp_path / "audit") as audit:
        engine = SecurityManager(Settings(**BASE), MemoryStore(), audit)
        frontends = CounterVec("a3mailer_security_frontend_requests_total")
        metrics = {m.name: m for m in SecurityCollector(engine, audit, frontends).collect()}
        samples = metrics["a3mailer_security_audit_write_errors"].samples
        assert [(s.name, s.value) for s in samples] == [
            ("a3mailer_security_audit_write_errors_total", 3.0)]
        without = {m.name for m in SecurityCollector(engine, None, frontends).collect()}
        assert "a3mailer_security_audit_write_errors" not in without


async def test_api_key_and_session_changes_go_on_without_an_audit_log(
        closed_log: tuple[AuditLog, AuditFailureLog]):
    from security.apikeys import ApiKeys
    from security.sessions import Sessions

    audit, failures = closed_log
    store = MemoryStore()
    keys = ApiKeys(store, audit=audit)
    key, token = await keys.create("ci", ["admin"])
    assert (await keys.authenticate(token)).ok  # created as the caller was told
    await keys.revoke(key.id)
    assert (await keys.authenticate(token)).reason == "revoked"
    sessions = Sessions(store, audit=audit)
    session, sid = await sessions.create("alice@example.org")
    assert await sessions.validate(sid) is not None
    await sessions.revoke(sid)
    assert await sessions.validate(sid) is None
    assert failures.failed >= 4  # create, revoke, session create, revoke (and the refusals)
