"""SecurityManager: decisions, distinct counting, lockout scoping, escalation, bans, stats.

A fake clock drives the engine; the audit log is a real AuditLog in tmp_path. Sources are
documentation addresses (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) with
`trusted_networks=()` unless a test is about trust.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.attempts import KNOWN_PROTOCOLS, Attempt, Decision, tracking_keys
from security.audit import AuditLog
from security.blocklist import Entry
from security.engine import SecurityManager
from security.settings import Settings
from security.store import Lock, StoreUnavailable
from security.store.memory import MemoryStore
from security.store.sqlite import SqliteStore

# Far in the future: SqliteStore.open() prunes failure rows by the wall clock.
T0 = 4_000_000_000.0
MSG = "Authentication temporarily refused"

BASE = dict(
    max_login_attempts=3,
    login_attempt_window=300.0,
    lockout_duration=60.0,
    lockout_exponential=True,
    lockout_max_duration=150.0,
    escalation_window=1000.0,
    account_lock_threshold=50,
    tarpit_enabled=True,
    tarpit_delay_per_failure=1.5,
    tarpit_max_delay=4.0,
    auto_ban_enabled=True,
    auto_ban_threshold=20,
    auto_ban_duration=600.0,
    trusted_networks=(),
    allowlist=(),
    fail_open=True,
)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ok() -> Decision:
    return Decision("allow", "ok")


def locked(retry_after: float, reason: str = "locked") -> Decision:
    return Decision("reject", reason, message=MSG, retry_after=retry_after)


def banned(retry_after: float) -> Decision:
    return Decision("reject", "banned", message=MSG, retry_after=retry_after)


def attempt(login: str, ip: str, pwhash: str = "", protocol: str = "imap") -> Attempt:
    return Attempt(login, ip, protocol, pwhash=pwhash)


async def fail(engine: SecurityManager, login: str, ip: str, pwhash: str = "",
               protocol: str = "imap") -> list[str]:
    return await engine.report(attempt(login, ip, pwhash, protocol), False)


async def check(engine: SecurityManager, login: str, ip: str) -> Decision:
    return await engine.check(attempt(login, ip))


def records(audit: AuditLog, *types: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(type, actor, subject, details) of the audit records of these types, oldest first."""
    found, _ = audit.query(types=list(types), limit=1000)
    return [(r["type"], r["actor"], r["subject"], r["details"]) for r in reversed(found)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    log = AuditLog(tmp_path / "audit")
    yield log
    log.close()


MakeEngine = Callable[..., Awaitable[SecurityManager]]


async def started_engines(audit: AuditLog, clock: Clock, default_store: Callable[[], Any]
                          ) -> AsyncIterator[MakeEngine]:
    """Started engines (maintenance effectively off) on default_store() unless given one;
    stopped at the end."""
    running: list[SecurityManager] = []

    async def make(store: Any = None, **overrides: Any) -> SecurityManager:
        engine = SecurityManager(Settings(**{**BASE, **overrides}), store or default_store(),
                                 audit, clock=clock)
        await engine.start(maintenance_interval=3600)
        running.append(engine)
        return engine

    yield make
    for engine in running:
        if engine._maintenance is not None:
            await engine.stop()


@pytest.fixture
async def make_engine(audit: AuditLog, clock: Clock) -> AsyncIterator[MakeEngine]:
    async for make in started_engines(audit, clock, MemoryStore):
        yield make


# --- plain decisions, trust


async def test_a_fresh_attempt_is_allowed(make_engine: MakeEngine, audit: AuditLog):
    engine = await make_engine()
    assert await check(engine, "alice", "192.0.2.1") == Decision("allow", "ok")
    assert await check(engine, "alice", "2001:db8::1") == Decision("allow", "ok")
    assert records(audit, "lockout.", "blocklist.") == []


async def test_loopback_is_trusted_by_default(make_engine: MakeEngine):
    engine = await make_engine(trusted_networks=Settings().trusted_networks)
    for _ in range(30):
        await fail(engine, "alice", "127.0.0.1", "x" + str(_))
    assert await check(engine, "alice", "127.0.0.1") == Decision("allow", "trusted")
    assert await check(engine, "alice", "::1") == Decision("allow", "trusted")
    assert await engine.lockouts() == []


async def test_trusted_and_allowlisted_sources_are_never_delayed_locked_or_banned(
        make_engine: MakeEngine, audit: AuditLog):
    engine = await make_engine(trusted_networks=("192.0.2.0/24",), allowlist=("198.51.100.7",),
                               account_lock_threshold=4, auto_ban_threshold=5)
    for i in range(30):
        for login in ("alice", f"user{i}"):
            assert await fail(engine, login, "192.0.2.10", f"t{i}") == []
            assert await fail(engine, login, "198.51.100.7", f"a{i}") == []
            assert await fail(engine, login, "::ffff:198.51.100.7", f"m{i}") == []
    assert await check(engine, "alice", "192.0.2.10") == Decision("allow", "trusted")
    assert await check(engine, "alice", "198.51.100.7") == Decision("allow", "allowlisted")
    assert await check(engine, "alice", "::ffff:198.51.100.7") == Decision("allow", "allowlisted")
    # nothing counted against the account either
    assert await check(engine, "alice", "203.0.113.5") == ok()
    assert await engine.lockouts() == [] and await engine.banned() == []
    assert records(audit, "lockout.", "blocklist.") == []
    assert len(records(audit, "auth.failure")) == 180  # the failures are still audited
    assert engine.store.tracked_keys() == 0


async def test_trust_wins_over_a_ban_and_a_lock(make_engine: MakeEngine):
    engine = await make_engine(allowlist=("192.0.2.1",))
    await engine.ban("192.0.2.0/24", "wide", None)
    assert await check(engine, "alice", "192.0.2.1") == Decision("allow", "allowlisted")
    assert await check(engine, "alice", "192.0.2.2") == banned(0.0)


# --- distinct counting and the account + source lock


async def test_the_same_wrong_password_repeated_never_locks(make_engine: MakeEngine,
                                                            audit: AuditLog):
    engine = await make_engine()
    for _ in range(20):
        assert await fail(engine, "alice", "192.0.2.1", "stale") == []
        decision = await check(engine, "alice", "192.0.2.1")
        assert decision == Decision("delay", "tarpit", delay=1.5)  # one distinct failure
    assert await engine.lockouts() == []
    assert records(audit, "lockout.") == []


async def test_distinct_wrong_passwords_lock_that_source_for_that_account_only(
        make_engine: MakeEngine, audit: AuditLog, clock: Clock):
    engine = await make_engine()
    assert await fail(engine, "alice", "192.0.2.1", "h1") == []
    assert await fail(engine, "Alice", "192.0.2.1", "h2") == []  # logins are case-folded
    assert await fail(engine, " alice ", "192.0.2.1", "h3") == ["lock"]

    assert await check(engine, "alice", "192.0.2.1") == locked(60.0)
    assert await check(engine, "ALICE", "::ffff:192.0.2.1") == locked(60.0)
    # the real user elsewhere, and other accounts from the attacker's address, still get in
    assert await check(engine, "alice", "198.51.100.2") == ok()
    assert await check(engine, "bob", "192.0.2.1") == ok()
    # the right password from the locked source: still rejected while locked
    assert await engine.report(attempt("alice", "192.0.2.1", "right"), True) == []
    clock.advance(30)
    assert await check(engine, "alice", "192.0.2.1") == locked(30.0)

    assert await engine.lockouts() == [
        Lock("p:192.0.2.1/32|alice", "source_account", "alice", "192.0.2.1/32",
             "3 distinct wrong passwords in 300s", T0, T0 + 60, 1)]
    assert records(audit, "lockout.") == [
        ("lockout.lock", "engine", "alice@192.0.2.1/32",
         {"scope": "source_account", "until": T0 + 60, "level": 1,
          "reason": "3 distinct wrong passwords in 300s"})]
    assert engine.stats.active_locks == {"source_account": 1, "account": 0}


async def test_failures_outside_the_window_do_not_lock(make_engine: MakeEngine,
                                                       clock: Clock):
    engine = await make_engine()
    await fail(engine, "alice", "192.0.2.1", "h1")
    await fail(engine, "alice", "192.0.2.1", "h2")
    clock.advance(301)
    assert await check(engine, "alice", "192.0.2.1") == ok()
    assert await fail(engine, "alice", "192.0.2.1", "h3") == []
    assert await check(engine, "alice", "192.0.2.1") == Decision("delay", "tarpit", delay=1.5)


# --- tarpit


async def test_tarpit_delay_grows_with_distinct_failures_and_success_clears_it(
        make_engine: MakeEngine):
    engine = await make_engine(max_login_attempts=6)
    for n, delay in ((1, 1.5), (2, 3.0), (3, 4.0), (4, 4.0), (5, 4.0)):
        await fail(engine, "alice", "192.0.2.1", f"h{n}")
        assert await check(engine, "alice", "192.0.2.1") == Decision("delay", "tarpit",
                                                                     delay=delay)
    assert await check(engine, "alice", "198.51.100.1") == ok()  # per source
    assert await check(engine, "bob", "192.0.2.1") == ok()  # and per account
    await engine.report(attempt("alice", "192.0.2.1", "right"), True)
    assert await check(engine, "alice", "192.0.2.1") == ok()


async def test_tarpit_disabled_never_delays(make_engine: MakeEngine):
    engine = await make_engine(tarpit_enabled=False)
    await fail(engine, "alice", "192.0.2.1", "h1")
    await fail(engine, "alice", "192.0.2.1", "h2")
    assert await check(engine, "alice", "192.0.2.1") == ok()


# --- lockout expiry and escalation


async def lock_pair(engine: SecurityManager, tag: str, login: str = "alice",
                    ip: str = "192.0.2.1") -> None:
    actions = [await fail(engine, login, ip, f"{tag}-{i}") for i in range(3)]
    assert actions[-1] == ["lock"], actions


async def test_a_lockout_expires_after_lockout_duration(make_engine: MakeEngine, clock: Clock):
    engine = await make_engine()
    await lock_pair(engine, "a")
    clock.advance(59.5)
    assert await check(engine, "alice", "192.0.2.1") == locked(0.5)
    clock.advance(0.5)
    assert await check(engine, "alice", "192.0.2.1") == ok()  # failures were cleared on lock
    assert await engine.lockouts() == []


async def test_repeat_lockouts_double_up_to_the_maximum(make_engine: MakeEngine, clock: Clock,
                                                        audit: AuditLog):
    engine = await make_engine()  # 60 s, max 150 s, escalation window 1000 s
    for round_, duration in enumerate((60.0, 120.0, 150.0, 150.0)):
        await lock_pair(engine, f"r{round_}")
        assert await check(engine, "alice", "192.0.2.1") == locked(duration)
        clock.advance(duration)
        assert await check(engine, "alice", "192.0.2.1") == ok()
    levels = [d["level"] for _, _, _, d in records(audit, "lockout.lock")]
    assert levels == [1, 2, 3, 4]
    # a lockout after a quiet escalation window starts again at the base duration
    clock.advance(1001)
    await lock_pair(engine, "later")
    assert await check(engine, "alice", "192.0.2.1") == locked(60.0)
    assert records(audit, "lockout.lock")[-1][3]["level"] == 1


async def test_escalation_is_per_account_and_source(make_engine: MakeEngine, clock: Clock):
    engine = await make_engine()
    await lock_pair(engine, "a")
    clock.advance(60)
    await lock_pair(engine, "b", ip="198.51.100.1")  # a first offence for this pair
    assert await check(engine, "alice", "198.51.100.1") == locked(60.0)


async def test_without_exponential_lockouts_stay_constant(make_engine: MakeEngine,
                                                          clock: Clock):
    engine = await make_engine(lockout_exponential=False)
    for round_ in range(4):
        await lock_pair(engine, f"r{round_}")
        assert await check(engine, "alice", "192.0.2.1") == locked(60.0)
        clock.advance(60)


# --- whole-account lock


async def test_whole_account_lock_needs_the_threshold_from_all_sources(
        make_engine: MakeEngine, audit: AuditLog, clock: Clock):
    engine = await make_engine(account_lock_threshold=6)
    sources = ["192.0.2.1", "198.51.100.1", "2001:db8::1"]
    actions = []
    for i in range(6):
        actions.append(await fail(engine, "alice", sources[i % 3], f"h{i}"))
        if i < 5:
            assert await check(engine, "alice", "203.0.113.9") == ok()
    assert actions == [[], [], [], [], [], ["account_lock"]]  # no source reached 3
    for ip in ("203.0.113.9", "192.0.2.1", "2001:db8:ffff::1"):
        assert await check(engine, "alice", ip) == locked(60.0, "account_locked")
    assert await check(engine, "bob", "192.0.2.1") == ok()
    assert records(audit, "lockout.") == [
        ("lockout.lock", "engine", "alice",
         {"scope": "account", "until": T0 + 60, "level": 1,
          "reason": "6 distinct wrong passwords from all sources in 300s"})]
    assert engine.stats.active_locks == {"source_account": 0, "account": 1}
    clock.advance(60)
    assert await check(engine, "alice", "203.0.113.9") == ok()


async def test_a_pair_lock_is_reported_before_the_account_lock(make_engine: MakeEngine):
    engine = await make_engine(account_lock_threshold=4)
    await lock_pair(engine, "a")
    assert await fail(engine, "alice", "198.51.100.1", "b") == ["account_lock"]
    assert await check(engine, "alice", "192.0.2.1") == locked(60.0, "locked")
    assert await check(engine, "alice", "198.51.100.1") == locked(60.0, "account_locked")


# --- automatic bans


async def test_auto_ban_after_the_threshold_over_many_accounts(make_engine: MakeEngine,
                                                               audit: AuditLog, clock: Clock):
    engine = await make_engine(auto_ban_threshold=5)
    actions = [await fail(engine, f"user{i}", "192.0.2.66", f"h{i}") for i in range(5)]
    assert actions == [[], [], [], [], ["ban"]]
    assert await check(engine, "someone", "192.0.2.66") == banned(600.0)
    assert await check(engine, "someone", "::ffff:192.0.2.66") == banned(600.0)
    assert await check(engine, "someone", "192.0.2.67") == ok()
    assert await engine.banned() == [
        Entry("192.0.2.66/32", "5 distinct wrong passwords in 300s", "automatic", T0, T0 + 600)]
    assert records(audit, "blocklist.") == [
        ("blocklist.ban", "engine", "192.0.2.66/32",
         {"reason": "5 distinct wrong passwords in 300s", "source": "automatic",
          "expires": T0 + 600})]
    assert engine.stats.active_bans == {"manual": 0, "automatic": 1, "feed": 0}
    clock.advance(200)
    assert await check(engine, "someone", "192.0.2.66") == banned(400.0)
    clock.advance(400)
    assert await check(engine, "someone", "192.0.2.66") == ok()


async def test_only_an_operator_may_shorten_a_ban(make_engine: MakeEngine, clock: Clock):
    """An automatic, feed or event ban never replaces a longer one: a Stalwart event made a
    permanent manual ban 6 s long, and the address got in when it ended."""
    engine = await make_engine()
    permanent = await engine.ban("192.0.2.70", "operator", None)
    kept = await engine.ban("192.0.2.70", "stalwart event", 6.0, source="feed:stalwart")
    assert kept == permanent and (await engine.banned()) == [permanent]
    await engine.ban("192.0.2.71", "short", 60.0, source="automatic")
    longer = await engine.ban("192.0.2.71", "feed", 3600.0, source="feed:drop")
    assert longer.expires == T0 + 3600 and longer.source == "feed:drop"  # longer: replaces
    assert (await engine.ban("192.0.2.71", "again", 60.0, source="automatic")) == longer
    clock.advance(7)
    assert await check(engine, "someone", "192.0.2.70") == banned(0.0)  # for good
    shortened = await engine.ban("192.0.2.70", "operator: a day after all", 86400.0)
    assert shortened.expires == T0 + 7 + 86400 and shortened.source == "manual"
    with pytest.raises(ValueError, match="scoped IPv6"):
        await engine.ban("fe80::2%eth0", "zone", None)


async def test_auto_ban_can_be_disabled(make_engine: MakeEngine):
    engine = await make_engine(auto_ban_threshold=5, auto_ban_enabled=False)
    for i in range(10):
        assert await fail(engine, f"user{i}", "192.0.2.66", f"h{i}") == []
    assert await engine.banned() == []


async def test_ipv6_sources_are_tracked_and_banned_by_their_64(make_engine: MakeEngine,
                                                                audit: AuditLog):
    engine = await make_engine(auto_ban_threshold=4)
    assert await fail(engine, "u0", "2001:db8::1", "h0") == []
    assert await fail(engine, "u1", "2001:db8::1", "h1") == []
    assert await fail(engine, "u2", "2001:db8::2", "h2") == []
    assert await fail(engine, "u3", "2001:db8::ffff:2", "h3") == ["ban"]
    assert await check(engine, "x", "2001:db8::abcd") == banned(600.0)
    assert await check(engine, "x", "2001:db8:0:1::1") == ok()  # the next /64
    assert records(audit, "blocklist.ban")[0][2] == "2001:db8::/64"
    assert [b.network for b in await engine.banned()] == ["2001:db8::/64"]


async def test_ipv6_pair_lock_covers_the_whole_64(make_engine: MakeEngine):
    engine = await make_engine()
    await fail(engine, "alice", "2001:db8::1", "h1")
    await fail(engine, "alice", "2001:db8::2", "h2")
    assert await fail(engine, "alice", "2001:db8::3", "h3") == ["lock"]
    assert await check(engine, "alice", "2001:db8::ffff") == locked(60.0)
    assert await check(engine, "alice", "2001:db8:0:1::1") == ok()
    assert [lock.source for lock in await engine.lockouts()] == ["2001:db8::/64"]


async def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(make_engine: MakeEngine):
    engine = await make_engine(auto_ban_threshold=4)
    await fail(engine, "u0", "::ffff:192.0.2.7", "h0")
    await fail(engine, "u1", "192.0.2.7", "h1")
    await fail(engine, "u2", "::ffff:192.0.2.7", "h2")
    assert await fail(engine, "u3", "192.0.2.7", "h3") == ["ban"]
    assert [b.network for b in await engine.banned()] == ["192.0.2.7/32"]
    assert await check(engine, "x", "::ffff:192.0.2.7") == banned(600.0)
    # and a pair lock too
    await fail(engine, "alice", "::ffff:198.51.100.7", "p1")
    await fail(engine, "alice", "198.51.100.7", "p2")
    assert await fail(engine, "alice", "::FFFF:198.51.100.7", "p3") == ["lock"]
    assert await check(engine, "alice", "198.51.100.7") == locked(60.0)


# --- administration: unlock, ban, unban, refresh, gauges


async def test_unlock_one_source_or_all_of_an_account(make_engine: MakeEngine,
                                                      audit: AuditLog):
    engine = await make_engine()
    await lock_pair(engine, "a", "alice", "192.0.2.1")
    await lock_pair(engine, "b", "alice", "198.51.100.1")
    await lock_pair(engine, "c", "bob", "192.0.2.1")
    assert engine.stats.active_locks == {"source_account": 3, "account": 0}

    removed = await engine.unlock("alice", source="192.0.2.1/32")
    assert [(lock.account, lock.source) for lock in removed] == [("alice", "192.0.2.1/32")]
    assert await check(engine, "alice", "192.0.2.1") == ok()  # its failures went too
    assert await check(engine, "alice", "198.51.100.1") == locked(60.0)
    assert engine.stats.active_locks == {"source_account": 2, "account": 0}

    removed = await engine.unlock(" ALICE ", actor="ops")
    assert [(lock.account, lock.source) for lock in removed] == [("alice", "198.51.100.1/32")]
    assert await check(engine, "alice", "198.51.100.1") == ok()
    assert await check(engine, "bob", "192.0.2.1") == locked(60.0)
    assert engine.stats.active_locks == {"source_account": 1, "account": 0}
    assert await engine.unlock("carol") == []

    assert records(audit, "lockout.unlock") == [
        ("lockout.unlock", "admin", "alice@192.0.2.1/32", {"scope": "source_account"}),
        ("lockout.unlock", "ops", "alice@198.51.100.1/32", {"scope": "source_account"})]


async def test_unlock_lifts_a_whole_account_lock(make_engine: MakeEngine, audit: AuditLog):
    engine = await make_engine(account_lock_threshold=4)
    for i, ip in enumerate(("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")):
        await fail(engine, "alice", ip, f"h{i}")
    assert await check(engine, "alice", "203.0.113.1") == locked(60.0, "account_locked")
    assert [lock.scope for lock in await engine.unlock("alice")] == ["account"]
    assert await check(engine, "alice", "203.0.113.1") == ok()
    assert records(audit, "lockout.unlock") == [
        ("lockout.unlock", "admin", "alice", {"scope": "account"})]
    assert engine.stats.active_locks == {"source_account": 0, "account": 0}


async def test_manual_ban_unban_and_expiry(make_engine: MakeEngine, audit: AuditLog,
                                           clock: Clock):
    engine = await make_engine()
    timed = await engine.ban("198.51.100.9/24", "abuse", 100)
    assert timed == Entry("198.51.100.0/24", "abuse", "manual", T0, T0 + 100)
    forever = await engine.ban("192.0.2.5", "forever", None)
    assert forever.network == "192.0.2.5/32" and forever.expires is None
    short = await engine.ban("2001:db8::/48", "short", 50, source="feed:drop", actor="feeds")
    assert engine.stats.active_bans == {"manual": 2, "automatic": 0, "feed": 1}
    assert await check(engine, "alice", "198.51.100.77") == banned(100.0)
    assert await check(engine, "alice", "192.0.2.5") == banned(0.0)  # permanent: 0
    assert await check(engine, "alice", "2001:db8:0:ff::1") == banned(50.0)

    assert await engine.unban("198.51.100.0/24") == timed
    assert await engine.unban("198.51.100.0/24") is None  # nothing to unban: no record
    assert await check(engine, "alice", "198.51.100.77") == ok()
    assert engine.stats.active_bans == {"manual": 1, "automatic": 0, "feed": 1}

    clock.advance(50)
    assert await check(engine, "alice", "2001:db8:0:ff::1") == ok()  # expired already
    await engine.refresh()
    assert engine.stats.active_bans == {"manual": 1, "automatic": 0, "feed": 0}
    assert await engine.banned() == [forever]
    await engine.refresh()  # expiry is audited once

    assert records(audit, "blocklist.") == [
        ("blocklist.ban", "admin", "198.51.100.0/24",
         {"reason": "abuse", "source": "manual", "expires": T0 + 100}),
        ("blocklist.ban", "admin", "192.0.2.5/32",
         {"reason": "forever", "source": "manual", "expires": None}),
        ("blocklist.ban", "feeds", "2001:db8::/48",
         {"reason": "short", "source": "feed:drop", "expires": T0 + 50}),
        ("blocklist.unban", "admin", "198.51.100.0/24", {"reason": "abuse"}),
        ("blocklist.expire", "engine", short.network, {"reason": "short"}),
    ]


async def test_a_bad_network_raises_value_error(make_engine: MakeEngine):
    engine = await make_engine()
    with pytest.raises(ValueError):
        await engine.ban("not-a-network", "x", None)
    with pytest.raises(ValueError):
        await engine.unban("192.0.2.300")


async def test_refresh_recounts_lock_gauges_after_expiry(make_engine: MakeEngine,
                                                         clock: Clock):
    engine = await make_engine()
    await lock_pair(engine, "a")
    assert engine.stats.active_locks["source_account"] == 1
    clock.advance(60)
    await engine.refresh()
    assert engine.stats.active_locks == {"source_account": 0, "account": 0}


async def test_banning_a_network_again_does_not_count_it_twice(make_engine: MakeEngine):
    engine = await make_engine()
    await engine.ban("192.0.2.0/24", "first", 100)
    await engine.ban("192.0.2.0/24", "again", 200)
    assert len(await engine.banned()) == 1
    assert engine.stats.active_bans == {"manual": 1, "automatic": 0, "feed": 0}


async def test_relocking_after_expiry_does_not_count_the_lock_twice(make_engine: MakeEngine,
                                                                   clock: Clock):
    engine = await make_engine()
    await lock_pair(engine, "a")
    clock.advance(60)
    await lock_pair(engine, "b")
    assert len(await engine.lockouts()) == 1
    assert engine.stats.active_locks == {"source_account": 1, "account": 0}


@pytest.mark.parametrize("given_source", ["192.0.2.1", "::ffff:192.0.2.1"])
async def test_unlock_accepts_the_source_as_a_plain_address(make_engine: MakeEngine,
                                                            given_source: str):
    engine = await make_engine()
    await lock_pair(engine, "a")
    removed = await engine.unlock("alice", source=given_source)
    assert [lock.source for lock in removed] == ["192.0.2.1/32"]
    assert await check(engine, "alice", "192.0.2.1") == ok()


# --- store failures: fail open or closed


class BrokenStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def _maybe_fail(self) -> None:
        if self.broken:
            raise StoreUnavailable("store is down")

    # the helpers both the public calls and the composed login calls go through
    def _lock(self, key, now):
        self._maybe_fail()
        return super()._lock(key, now)

    def _failure_count(self, key, now, window):
        self._maybe_fail()
        return super()._failure_count(key, now, window)

    def _record_failure(self, key, pwhash, now, window):
        self._maybe_fail()
        return super()._record_failure(key, pwhash, now, window)


async def test_fail_open_allows_when_the_store_fails(make_engine: MakeEngine):
    store = BrokenStore()
    engine = await make_engine(store, fail_open=True)
    assert await check(engine, "alice", "192.0.2.1") == Decision("allow", "store_unavailable")
    assert await check(engine, "bob", "192.0.2.2") == Decision("allow", "store_unavailable")
    assert engine.stats.store_errors == {"check": 2}
    assert engine.stats.fail_open == 2
    assert engine.stats.decisions == {("allow", "store_unavailable"): 2}
    assert await fail(engine, "alice", "192.0.2.1", "h") == []  # report swallows the error
    assert engine.stats.store_errors == {"check": 2, "report": 1}
    # bans come from memory, so a banned source stays banned while the store is down
    await engine.ban("192.0.2.1", "x", None)
    assert await check(engine, "alice", "192.0.2.1") == banned(0.0)
    store.broken = False
    assert await check(engine, "alice", "192.0.2.9") == ok()


async def test_fail_closed_rejects_when_the_store_fails(make_engine: MakeEngine):
    engine = await make_engine(BrokenStore(), fail_open=False)
    assert await check(engine, "alice", "192.0.2.1") == Decision(
        "reject", "store_unavailable", message=MSG)
    assert await fail(engine, "alice", "192.0.2.1", "h") == []
    assert engine.stats.store_errors == {"check": 1, "report": 1}
    assert engine.stats.fail_open == 0
    assert engine.stats.decisions == {("reject", "store_unavailable"): 1}


async def test_fail_open_counts_allowed_logins_not_failed_reports(make_engine: MakeEngine):
    engine = await make_engine(BrokenStore(), fail_open=True)
    assert await check(engine, "alice", "192.0.2.1") == Decision("allow", "store_unavailable")
    await fail(engine, "alice", "192.0.2.1", "h")
    assert engine.stats.store_errors == {"check": 1, "report": 1}
    assert engine.stats.fail_open == 1


async def test_a_bad_ip_raises_value_error(make_engine: MakeEngine):
    engine = await make_engine()
    for bad in ("not-an-ip", "192.0.2.300", "", "192.0.2.0/24"):
        with pytest.raises(ValueError):
            await engine.check(attempt("alice", bad))
    assert engine.stats.decisions == {}


# --- stats


async def test_stats_count_by_protocol_and_decision_without_logins_or_ips(
        make_engine: MakeEngine):
    engine = await make_engine(allowlist=("198.51.100.50",))
    await engine.report(attempt("alice@example.org", "192.0.2.1", "h1", "IMAP"), False)
    await engine.report(attempt("alice@example.org", "192.0.2.1", "h2", "imap"), False)
    await engine.report(attempt("bob@example.org", "2001:db8::7", "", "pop3"), True)
    await engine.report(attempt("carol@example.org", "192.0.2.3", "h", "carrier-pigeon"), True)
    await engine.report(attempt("carol@example.org", "192.0.2.3", "h", ""), False)
    await fail(engine, "alice@example.org", "192.0.2.1", "h3")  # locks
    for login, ip in (("alice@example.org", "192.0.2.1"), ("carol@example.org", "192.0.2.3"),
                      ("bob@example.org", "2001:db8::7"), ("dave@example.org", "198.51.100.50")):
        await check(engine, login, ip)
    await engine.ban("203.0.113.0/24", "x", None)
    await check(engine, "erin@example.org", "203.0.113.4")

    assert engine.stats.attempts == {("imap", "failure"): 3.0, ("pop3", "success"): 1.0,
                                     ("other", "success"): 1.0, ("other", "failure"): 1.0}
    assert engine.stats.decisions == {("reject", "locked"): 1.0, ("delay", "tarpit"): 1.0,
                                      ("allow", "ok"): 1.0, ("allow", "allowlisted"): 1.0,
                                      ("reject", "banned"): 1.0}
    assert sum(engine.stats.latency_counts) == 5

    tables = (engine.stats.attempts, engine.stats.decisions, engine.stats.store_errors,
              engine.stats.active_locks, engine.stats.active_bans)
    labels = {str(part) for table in tables for key in table
              for part in (key if isinstance(key, tuple) else (key,))}
    bounded = (KNOWN_PROTOCOLS | {"other", "success", "failure", "allow", "delay", "reject",
                                  "ok", "trusted", "allowlisted", "tarpit", "banned", "locked",
                                  "account_locked", "store_unavailable", "source_account",
                                  "account", "manual", "automatic", "feed", "check", "report"})
    assert labels <= bounded, labels - bounded  # no logins, addresses or networks


# --- restart with SQLite


async def test_locks_bans_and_escalation_survive_a_restart_with_sqlite(
        make_engine: MakeEngine, tmp_path: Path, clock: Clock):
    path = tmp_path / "state" / "security.db"
    first = await make_engine(SqliteStore(path, flush_interval=0.05), auto_ban_threshold=10)
    await lock_pair(first, "a")
    for i in range(10):
        await fail(first, f"user{i}", "198.51.100.66", f"b{i}")
    await first.ban("203.0.113.0/24", "manual", None)
    await first.stop()

    clock.advance(10)
    second = await make_engine(SqliteStore(path, flush_interval=0.05), auto_ban_threshold=10)
    assert await check(second, "alice", "192.0.2.1") == locked(50.0)
    assert await check(second, "alice", "198.51.100.66") == banned(590.0)
    assert await check(second, "alice", "203.0.113.3") == banned(0.0)
    assert second.stats.active_locks == {"source_account": 1, "account": 0}
    assert second.stats.active_bans == {"manual": 1, "automatic": 1, "feed": 0}
    # the offence count survived too: the next lockout is the second, twice as long
    clock.advance(50)
    await lock_pair(second, "b")
    assert await check(second, "alice", "192.0.2.1") == locked(120.0)
    await second.stop()


async def test_failure_counters_survive_a_restart_with_sqlite(make_engine: MakeEngine,
                                                              tmp_path: Path):
    path = tmp_path / "security.db"
    first = await make_engine(SqliteStore(path, flush_interval=0.05))
    await fail(first, "alice", "192.0.2.1", "h1")
    await fail(first, "alice", "192.0.2.1", "h2")
    await first.stop()
    second = await make_engine(SqliteStore(path, flush_interval=0.05))
    assert await check(second, "alice", "192.0.2.1") == Decision("delay", "tarpit", delay=3.0)
    assert await fail(second, "alice", "192.0.2.1", "h3") == ["lock"]
    await second.stop()


async def test_a_ban_that_expires_while_stopped_is_not_loaded(make_engine: MakeEngine,
                                                              tmp_path: Path, clock: Clock):
    path = tmp_path / "security.db"
    first = await make_engine(SqliteStore(path, flush_interval=0.05))
    await first.ban("192.0.2.1", "short", 10)
    await first.stop()
    clock.advance(10)
    second = await make_engine(SqliteStore(path, flush_interval=0.05))
    assert await check(second, "alice", "192.0.2.1") == ok()
    assert second.stats.active_bans == {"manual": 0, "automatic": 0, "feed": 0}
    await second.stop()


# --- property: never a pair lock below max_login_attempts distinct passwords

SOURCES = {  # address -> the network the engine must track it by
    "192.0.2.1": "192.0.2.1/32",
    "::ffff:192.0.2.1": "192.0.2.1/32",
    "198.51.100.2": "198.51.100.2/32",
    "2001:db8::1": "2001:db8::/64",
    "2001:db8::2": "2001:db8::/64",
    "2001:db8:1::1": "2001:db8:1::/64",
}
PROPERTY_SETTINGS = Settings(**{**BASE, "max_login_attempts": 3, "login_attempt_window": 60.0,
                                "lockout_duration": 30.0, "account_lock_threshold": 8,
                                "auto_ban_threshold": 10})

step = st.tuples(st.sampled_from(sorted(SOURCES)), st.sampled_from(["alice", "bob"]),
                 st.sampled_from(["", "p1", "p2", "p3", "p4"]),
                 st.sampled_from([0.0, 0.0, 1.0, 5.0, 20.0, 45.0]))


async def _run_failures(steps: list[tuple[str, str, str, float]]) -> None:
    s = PROPERTY_SETTINGS
    now = [T0]
    engine = SecurityManager(s, MemoryStore(), None, clock=lambda: now[0])
    history: dict[tuple[str, str], list[tuple[int, float, str]]] = {}
    last_lock: dict[tuple[str, str], int] = {}
    for index, (ip, login, pwhash, dt) in enumerate(steps):
        now[0] += dt
        pair = (SOURCES[ip], login)
        history.setdefault(pair, []).append((index, now[0], pwhash or f"#{index}"))
        lock_key = tracking_keys(login, SOURCES[ip]).pair
        was_locked = await engine.store.get_lock(lock_key, now[0]) is not None
        actions = await engine.report(attempt(login, ip, pwhash), False)

        in_window = [(i, h) for i, t, h in history[pair] if t >= now[0] - s.login_attempt_window]
        if "lock" in actions:
            assert not was_locked
            assert len({h for _, h in in_window}) >= s.max_login_attempts, (pair, in_window)
            last_lock[pair] = index
        since_lock = {h for i, h in in_window if i > last_lock.get(pair, -1)}
        if not was_locked and len(since_lock) >= s.max_login_attempts:
            assert "lock" in actions, (pair, since_lock)
        if "lock" not in actions and not was_locked:
            assert await engine.store.get_lock(lock_key, now[0]) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, max_size=40))
def test_property_no_pair_lock_below_max_distinct_passwords_in_window(steps):
    asyncio.run(_run_failures(steps))


async def test_an_attempt_keeps_its_keys_for_its_report_until_the_prefix_changes(
        make_engine: MakeEngine):
    import dataclasses

    engine = await make_engine()
    attempt = Attempt("alice", "2001:db8:1:2:3::9", pwhash="h1")
    assert await engine.check(attempt) == ok()
    same = Attempt("alice", "2001:db8:1:2:3::9", pwhash="h1")
    assert attempt == same and hash(attempt) == hash(same)  # the kept keys are no field
    await engine.report(attempt, False)
    assert engine.store.failures_of("p:2001:db8:1:2::/64|alice") is not None
    engine.settings = dataclasses.replace(engine.settings, ipv6_prefix_length=48)  # a reload
    await engine.report(dataclasses.replace(attempt, pwhash="h2"), False)
    await engine.report(attempt, False)  # the same object: its keys are made again
    assert set(engine.store.failures_of("p:2001:db8:1::/48|alice")) == {"h1", "h2"}


# --- without an observer, check and report skip the observation: the same results


class _Observation:
    def set(self, key: str, value: str | bool | int | float) -> None:
        return None

    def fail(self, error_type: str) -> None:
        return None


def _do_nothing_observer(operation: str) -> contextlib.nullcontext[_Observation]:
    return contextlib.nullcontext(_Observation())


async def _run_observed_and_not(steps: list[tuple[tuple[str, str, str, float], bool]]
                                ) -> None:
    now = [T0]
    plain = SecurityManager(PROPERTY_SETTINGS, MemoryStore(), None, clock=lambda: now[0])
    observed = SecurityManager(PROPERTY_SETTINGS, MemoryStore(), None, clock=lambda: now[0],
                               observer=_do_nothing_observer)
    for (ip, login, pwhash, dt), success in steps:
        now[0] += dt
        results = []
        for engine in (plain, observed):
            login_attempt = attempt(login, ip, pwhash)
            decision = await engine.check(login_attempt)
            results.append((decision, await engine.report(login_attempt, success)))
        assert results[0] == results[1]
    for table in ("attempts", "decisions", "store_errors", "lock_scopes", "ban_kinds"):
        assert getattr(plain.stats, table) == getattr(observed.stats, table)
    assert sum(plain.stats.latency_counts) == sum(observed.stats.latency_counts)
    assert await plain.lockouts() == await observed.lockouts()
    assert await plain.banned() == await observed.banned()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(step, st.booleans()), max_size=40))
def test_property_the_unobserved_path_decides_as_the_observed_one(steps):
    asyncio.run(_run_observed_and_not(steps))
