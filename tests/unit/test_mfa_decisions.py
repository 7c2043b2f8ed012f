"""Point 11: SecurityManager answers mfa_required (risky network, risky source, new device,
new source) for users with a confirmed second factor; what Dovecot is answered for it; and
the pure pieces of code delivery (one-time codes, the circuit breaker)."""

from __future__ import annotations

import asyncio
import dataclasses

import pyotp
import pytest

from security.attempts import Attempt, Decision
from security.engine import SecurityManager
from security.mfa.manager import LoginContext, MfaManager
from security.mfa.otp import OneTimeCodes
from security.mfa.sealing import Sealer
from security.mfa.settings import MfaSettings, Policy
from security.mfa.sms import CircuitBreaker
from security.protocols import dovecot
from security.settings import Settings
from security.store.memory import MemoryStore
from tests.unit.test_mfa_totp import KEY, Clock
from tests.unit.test_security_engine import BASE

WEB = "198.51.100.10"


async def engine_with(policy: Policy | None = None, **settings) -> tuple[SecurityManager,
                                                                        MfaManager, Clock]:
    clock, store = Clock(), MemoryStore()
    engine = SecurityManager(Settings(**{**BASE, **settings}), store, clock=clock)
    manager = MfaManager(MfaSettings(policy=policy or Policy()), store, Sealer(KEY),
                         clock=clock)
    engine.second_factor = manager
    engine.mfa_message = manager.settings.policy.message
    return engine, manager, clock


async def confirm_totp(manager: MfaManager, clock: Clock, user: str,
                       context: LoginContext | None = None) -> str:
    secret = (await manager.enroll_totp(user))["secret"]
    assert (await manager.verify_totp(user, pyotp.TOTP(secret).at(clock.now), context)).valid
    return secret


def attempt(ip: str = WEB, device: str = "", login: str = "alice") -> Attempt:
    return Attempt(login, ip, "webmail", device_id=device)


async def test_users_without_a_confirmed_factor_are_never_asked():
    engine, manager, _ = await engine_with()
    assert await engine.check(attempt()) == Decision("allow", "ok")
    await manager.enroll_totp("alice")  # pending, not confirmed
    assert (await engine.check(attempt(device="d1"))).action == "allow"


async def test_new_device_and_new_source_need_a_second_factor_until_remembered():
    engine, manager, clock = await engine_with()
    await confirm_totp(manager, clock, "alice")  # no context: nothing remembered
    decision = await engine.check(attempt(device="phone"))
    assert decision == Decision("mfa_required", "new_device", message=engine.mfa_message)
    assert (await engine.check(attempt())).reason == "new_source"  # no device id given
    assert (await manager.status("alice"))["remembered_devices"] == 0
    clock.now += 60
    # a verified second factor from this device and network remembers both
    await manager.reset("alice")
    await confirm_totp(manager, clock, "alice", LoginContext(WEB, "phone"))
    assert await engine.check(attempt(device="phone")) == Decision("allow", "ok")
    assert (await engine.check(attempt(device="laptop"))).reason == "new_device"
    assert (await engine.check(attempt("203.0.113.5", "phone"))).reason == "new_source"
    assert (await engine.check(attempt(login="ALICE ", device="phone"))).action == "allow"
    assert engine.stats.decisions[("mfa_required", "new_device")] == 2
    # remembered for remember_for only
    clock.now += manager.settings.policy.remember_for + 1
    assert (await engine.check(attempt(device="phone"))).reason == "new_device"


async def test_risky_networks_and_sources_need_it_even_when_remembered():
    engine, manager, clock = await engine_with(Policy(risky_networks=("203.0.113.0/24",),
                                                      risky_source_failures=2))
    await confirm_totp(manager, clock, "alice", LoginContext("203.0.113.7", "phone"))
    assert (await engine.check(attempt("203.0.113.7", "phone"))).reason == "risky_network"
    await confirm_totp(manager, clock, "bob", LoginContext(WEB, "pc"))
    assert (await engine.check(attempt(WEB, "pc", "bob"))).action == "allow"
    for n in range(2):  # two distinct wrong passwords from WEB, on another account
        await engine.report(Attempt("carol", WEB, "webmail", pwhash=f"h{n}"), False)
    decision = await engine.check(attempt(WEB, "pc", "bob"))
    assert decision.action == "mfa_required" and decision.reason == "risky_source"


async def test_the_tarpit_delay_is_kept_and_rejections_still_win():
    engine, manager, clock = await engine_with(Policy(on_new_source=False))
    await confirm_totp(manager, clock, "alice")
    await engine.report(Attempt("alice", WEB, "webmail", pwhash="h1"), False)
    decision = await engine.check(attempt(device="new"))
    assert decision.action == "mfa_required" and decision.delay == 1.5
    for n in range(2, 4):
        await engine.report(Attempt("alice", WEB, "webmail", pwhash=f"h{n}"), False)
    assert (await engine.check(attempt(device="new"))).action == "reject"  # locked


async def test_trusted_networks_are_not_asked():
    engine, manager, clock = await engine_with(trusted_networks=("10.0.0.0/8",))
    await confirm_totp(manager, clock, "alice")
    assert (await engine.check(attempt("10.1.2.3", "new"))).reason == "trusted"


async def test_switches_turn_rules_off():
    engine, manager, clock = await engine_with(Policy(on_new_device=False,
                                                      on_new_source=False))
    await confirm_totp(manager, clock, "alice")
    assert (await engine.check(attempt("203.0.113.1", "any"))).action == "allow"


def test_dovecot_answers_for_mfa_required():
    required = Decision("mfa_required", "new_source", message="Second factor required")
    assert dovecot.answer(required) == {"status": 0, "msg": ""}
    assert dovecot.answer(dataclasses.replace(required, delay=2.2)) == {"status": 3, "msg": ""}
    assert dovecot.answer(required, mfa_reject=True) == {"status": -1,
                                                         "msg": "Second factor required"}
    assert dovecot.answer(Decision("allow", "ok"), mfa_reject=True) == {"status": 0, "msg": ""}


async def test_the_store_failing_during_the_question_fails_open_or_closed():
    engine, manager, clock = await engine_with()
    await confirm_totp(manager, clock, "alice")

    async def broken(*args: object) -> dict:
        raise ConnectionError("store down")

    # the one store call of a check, which reads the user's MFA fields with the rest
    manager.store.login_state = broken  # type: ignore[method-assign]
    assert (await engine.check(attempt())).reason == "store_unavailable"
    assert (await engine.check(attempt())).action == "allow"
    engine.configure(dataclasses.replace(engine.settings, fail_open=False))
    assert (await engine.check(attempt())).action == "reject"


# --- one-time codes and the circuit breaker (pure logic)


async def test_one_time_codes_limit_attempts_and_are_single_use():
    store, now = MemoryStore(), 1000.0
    codes = OneTimeCodes(store, Sealer(KEY), digits=6, lifetime=60, max_attempts=3)
    code = await codes.issue("alice", "sms", now)
    assert len(code) == 6 and code.isdigit()
    assert code not in str(await store.mfa_fields("alice"))
    results = [(await codes.check("alice", "sms", "000000" if code != "000000" else "111111",
                                  now)).result for _ in range(3)]
    assert results == ["invalid"] * 3
    assert (await codes.check("alice", "sms", code, now)).result == "no_code"  # voided
    code = await codes.issue("alice", "sms", now)  # a new code resets the attempts
    assert (await codes.check("alice", "sms", code, now)).result == "ok"
    assert (await codes.check("alice", "sms", code, now)).result == "no_code"
    code = await codes.issue("alice", "sms", now)
    checks = await asyncio.gather(*(codes.check("alice", "sms", code, now) for _ in range(5)))
    assert sorted(c.result for c in checks).count("ok") == 1
    code = await codes.issue("alice", "sms", now)
    assert (await codes.check("alice", "sms", code, now + 60)).result == "expired"
    first, second = await codes.issue("bob", "sms", now), await codes.issue("bob", "sms", now)
    if first != second:
        assert (await codes.check("bob", "sms", first, now)).result == "invalid"
    assert (await codes.check("bob", "sms", second, now)).result == "ok"


def test_the_circuit_breaker_opens_half_opens_and_closes():
    clock = Clock(0.0)
    breaker = CircuitBreaker(threshold=2, reset_timeout=10, clock=clock)
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now = 10
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.failure()  # the trial failed: open again, for another reset_timeout
    assert breaker.state == "open"
    clock.now = 20
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0


def test_templates_must_carry_the_code():
    from security.mfa.delivery import check_template

    check_template("Your code: ${code}", "t")
    with pytest.raises(ValueError, match=r"\$code"):
        check_template("no code here", "t")
