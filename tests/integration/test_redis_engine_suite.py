"""The engine's behaviour suites (tests/unit/test_security_engine.py and the MFA decisions
of tests/unit/test_mfa_decisions.py) with a real Redis store, and a differential check:
random failure sequences decide alike on the memory store and on Redis.

The engine reads and writes Redis through one script per check and one per wrong
password; these prove the scripts decide as the memory store's composed calls do, under
the same fake clock (locks and failure windows are judged by the caller's `now`, as on the
memory store). Left out: the tests that bring their own store (SQLite restarts, a broken
store); test_repeat_lockouts_double_up_to_the_maximum, whose last step waits out the
escalation window on the fake clock (Redis counts offences in its own time, by TTL; the
levels themselves are in the store suite). test_manual_ban_unban_and_expiry runs here too:
with a shared store, refresh() reloads the bans through Store.bans(), which drops an
expired ban as it lists it, so the engine now takes the expired ones from the list it
holds first (before 2026-12-02 a ban's expiry was never audited on Redis).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.audit import AuditLog
from security.engine import SecurityManager
from security.store.memory import MemoryStore
from security.store.redis import RedisStore
from tests.unit import test_mfa_decisions
from tests.unit import test_security_engine as engine_suite
from tests.unit.test_mfa_decisions import (  # noqa: F401 - collected here with a Redis store
    test_new_device_and_new_source_need_a_second_factor_until_remembered,
    test_risky_networks_and_sources_need_it_even_when_remembered,
    test_switches_turn_rules_off,
    test_the_tarpit_delay_is_kept_and_rejections_still_win,
    test_users_without_a_confirmed_factor_are_never_asked,
)
from tests.unit.test_security_engine import (  # noqa: F401 - collected here with a Redis store
    BASE,
    PROPERTY_SETTINGS,
    T0,
    Clock,
    MakeEngine,
    attempt,
    step,
    test_a_bad_ip_raises_value_error,
    test_a_fresh_attempt_is_allowed,
    test_a_lockout_expires_after_lockout_duration,
    test_a_pair_lock_is_reported_before_the_account_lock,
    test_an_ipv4_mapped_address_counts_as_its_ipv4_address,
    test_auto_ban_after_the_threshold_over_many_accounts,
    test_auto_ban_can_be_disabled,
    test_banning_a_network_again_does_not_count_it_twice,
    test_distinct_wrong_passwords_lock_that_source_for_that_account_only,
    test_escalation_is_per_account_and_source,
    test_failures_outside_the_window_do_not_lock,
    test_ipv6_pair_lock_covers_the_whole_64,
    test_ipv6_sources_are_tracked_and_banned_by_their_64,
    test_manual_ban_unban_and_expiry,
    test_refresh_recounts_lock_gauges_after_expiry,
    test_relocking_after_expiry_does_not_count_the_lock_twice,
    test_stats_count_by_protocol_and_decision_without_logins_or_ips,
    test_tarpit_delay_grows_with_distinct_failures_and_success_clears_it,
    test_tarpit_disabled_never_delays,
    test_the_same_wrong_password_repeated_never_locks,
    test_trust_wins_over_a_ban_and_a_lock,
    test_trusted_and_allowlisted_sources_are_never_delayed_locked_or_banned,
    test_unlock_accepts_the_source_as_a_plain_address,
    test_unlock_lifts_a_whole_account_lock,
    test_unlock_one_source_or_all_of_an_account,
    test_whole_account_lock_needs_the_threshold_from_all_sources,
    test_without_exponential_lockouts_stay_constant,
)

pytestmark = pytest.mark.integration

# the unit suite's fixtures: a fake clock and an audit log in tmp_path
audit, clock = engine_suite.audit, engine_suite.clock


@pytest.fixture
async def make_engine(audit: AuditLog, clock: Clock, redis_module: Any
                      ) -> AsyncIterator[MakeEngine]:
    """The unit suite's engines, with a RedisStore (a fresh key prefix) as the default."""
    def redis_store() -> RedisStore:
        return RedisStore(redis_module.url, prefix=f"test-{uuid.uuid4().hex[:8]}:")

    async for make in engine_suite.started_engines(audit, clock, redis_store):
        yield make


@pytest.fixture(autouse=True)
async def mfa_on_redis(monkeypatch: pytest.MonkeyPatch, redis_module: Any
                       ) -> AsyncIterator[None]:
    """test_mfa_decisions builds its engine's store as MemoryStore(): here, a RedisStore."""
    made: list[RedisStore] = []

    def redis_store() -> RedisStore:
        made.append(RedisStore(redis_module.url, prefix=f"test-{uuid.uuid4().hex[:8]}:"))
        return made[-1]

    monkeypatch.setattr(test_mfa_decisions, "MemoryStore", redis_store)
    yield
    for store in made:
        await store.close()


# --- differential: the same random failures and checks, memory store and Redis


async def _lock_view(engine: SecurityManager) -> list[tuple[Any, ...]]:
    return [(lock.key, lock.scope, lock.reason, lock.created, lock.until, lock.level)
            for lock in await engine.lockouts()]


async def _same_decisions(url: str, steps: list[tuple[str, str, str, float]]) -> None:
    now = [T0]
    redis = RedisStore(url, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    # the steps add up to at most 1,800 s: an escalation window longer than that never
    # passes (Redis would count it in its own time, the memory store on the fake clock)
    settings_ = dataclasses.replace(PROPERTY_SETTINGS, escalation_window=10_000.0)
    engines = [SecurityManager(settings_, MemoryStore(), None, clock=lambda: now[0]),
               SecurityManager(settings_, redis, None, clock=lambda: now[0])]
    try:
        for ip, login, pwhash, dt in steps:
            now[0] += dt
            if pwhash == "p4":  # now and then a check instead of a failure
                memory, shared = [await e.check(attempt(login, ip)) for e in engines]
            else:
                memory, shared = [await e.report(attempt(login, ip, pwhash), False)
                                  for e in engines]
            assert memory == shared, (ip, login, pwhash, now[0] - T0)
            locks = [await _lock_view(e) for e in engines]
            assert locks[0] == locks[1], (ip, login, pwhash, now[0] - T0)
    finally:
        await redis.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(step, max_size=40))
def test_random_failures_decide_alike_on_memory_and_redis(redis_module: Any, steps):
    asyncio.run(_same_decisions(redis_module.url, steps))

