"""SecurityManager: the one entry for login decisions.

check(attempt) answers before the password is verified: allow, delay (tarpit) or
reject. report(attempt, success) feeds the outcome back. Failures are counted as
*distinct* passwords (by pwhash) per key, so a phone retrying one stale password,
or many users behind one NAT address, do not look like password guessing.

Lockout scoping, so an attacker cannot lock a real user out from anywhere:
- account + source network (the IPv4 address, or the IPv6 /64): locked after
  max_login_attempts distinct wrong passwords within login_attempt_window, for
  lockout_duration, doubling for each repeat within escalation_window (capped);
  the user still logs in from anywhere else;
- the whole account: only after account_lock_threshold distinct wrong passwords
  from all sources within the window (at most 100, NIST SP 800-63B's limit);
- a source network that tries auto_ban_threshold distinct passwords on any
  accounts is banned for auto_ban_duration.
Trusted networks and allowlisted addresses are never delayed, locked or banned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from security.attempts import ALLOW, Attempt, Decision, Keys, parse_ip, tracking_keys
from security.blocklist import CidrSet, Entry, Lists, ban_network, parse_network, prefix_of
from security.settings import Settings
from security.store import Lock, LockPolicy, Store, is_outage

log = logging.getLogger(__name__)

# Decision latency buckets (seconds): an in-memory decision takes microseconds.
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                   0.01, 0.025, 0.05, 0.1)


class Auditor(Protocol):
    """What the engine writes audit records to (security.audit.AuditLog)."""

    def append(self, type: str, actor: str, subject: str,
               details: dict[str, Any] | None = None) -> Any: ...


class AuditFailureLog:
    """Logs records the audit log refused, without flooding: a full disk fails every
    login's record, so the first failure is logged with its traceback and the next at most
    once per `interval` seconds, with how many failed since the last line."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.failed = 0  # all failures since start
        self._logged_at = -float("inf")
        self._since = 0  # failures since the last line

    def failure(self, type_: str) -> None:
        """Called from an `except` block (the traceback is the current exception's)."""
        self.failed += 1
        self._since += 1
        now = self.clock()
        if now - self._logged_at < self.interval:
            return
        log.error("audit record failed; the operation goes on", exc_info=True,
                  extra={"type": type_, "failed_since_last_report": self._since,
                         "failed_total": self.failed})
        self._logged_at, self._since = now, 0


AUDIT_FAILURES = AuditFailureLog()


def record_audit(audit: Auditor | None, type_: str, actor: str, subject: str,
                 details: dict[str, Any]) -> None:
    """One audit record of an operation: a failing audit log (disk full) never fails a
    login or a verification, nor an admin change the store already holds (its caller would
    see an error for a change that was made); AUDIT_FAILURES logs and counts it."""
    if audit is not None:
        try:
            audit.append(type_, actor, subject, details)
        except Exception:
            AUDIT_FAILURES.failure(type_)


class SecondFactor(Protocol):
    """Answers whether a login needs a second factor (security.mfa.manager.MfaManager),
    from the user's MFA fields and the source's failures, which check() reads from the
    store together with everything else it needs."""

    def second_factor_reason(self, login: str, remote_ip: str, device_id: str,
                             fields: dict[str, str], source_failures: int) -> str | None: ...


class Observation(Protocol):
    """What an observer hands back for one operation: attributes for its span (bounded
    values only: never a login, an address or a hash) and its failure, if any."""

    def set(self, key: str, value: str | bool | int | float) -> None: ...

    def fail(self, error_type: str) -> None: ...


# observer("check") -> a context manager around the operation. The exporter passes one
# that times it for its performance monitor and makes it a span; this package imports
# neither (it stays a library), and without an observer nothing more is measured.
Observer = Callable[[str], AbstractContextManager[Observation]]


class _Unobserved:
    def __enter__(self) -> _Unobserved:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, key: str, value: str | bool | int | float) -> None:
        return None

    def fail(self, error_type: str) -> None:
        return None


_UNOBSERVED = _Unobserved()


def _unobserved(operation: str) -> _Unobserved:
    return _UNOBSERVED


class Stats:
    """Plain counters the exporter turns into metrics (no user names or IPs in keys)."""

    def __init__(self) -> None:
        self.attempts: dict[tuple[str, str], float] = {}  # (protocol, result)
        self.decisions: dict[tuple[str, str], float] = {}  # (action, reason)
        self.store_errors: dict[str, float] = {}  # operation
        self.fail_open = 0.0
        self.latency_counts = [0.0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        # kept in step with every lock and ban; counted when read (a scrape), so a flood of
        # locks costs one dict write each, not a recount of all of them
        self.lock_scopes: dict[str, str] = {}  # lock key -> scope
        self.ban_kinds: dict[str, str] = {}  # network -> manual | automatic | feed | config

    @property
    def active_locks(self) -> dict[str, int]:
        locks = {"source_account": 0, "account": 0}
        for scope in self.lock_scopes.values():
            locks[scope] = locks.get(scope, 0) + 1
        return locks

    @property
    def active_bans(self) -> dict[str, int]:
        bans = {"manual": 0, "automatic": 0, "feed": 0}
        for kind in self.ban_kinds.values():
            bans[kind] = bans.get(kind, 0) + 1
        return bans

    def count(self, table: dict[Any, float], key: Any) -> None:
        table[key] = table.get(key, 0.0) + 1

    def observe(self, seconds: float) -> None:
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


class SecurityManager:
    def __init__(self, settings: Settings, store: Store, audit: Auditor | None = None,
                 clock: Callable[[], float] = time.time, observer: Observer | None = None):
        self.store = store
        self.audit = audit
        self.clock = clock
        self.observe: Observer = observer or _unobserved
        self.stats = Stats()
        self.lists = Lists()
        self._maintenance: asyncio.Task[None] | None = None
        self.second_factor: SecondFactor | None = None  # set when MFA is enabled
        self.mfa_message = "Second factor required"
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Applies new settings (also on reload)."""
        self.settings = settings
        now = self.clock()
        self.lists.trusted = CidrSet([Entry(network, "trusted network", "config", now)
                                      for network in settings.trusted_networks])
        self.lists.allow = CidrSet([Entry(network, "allowlist", "config", now)
                                    for network in settings.allowlist])
        self.lock_policy = lock_policy(settings)

    # --- lifecycle

    async def start(self, maintenance_interval: float = 5.0) -> None:
        """Opens the store and loads its bans. A shared store (Redis) that cannot be
        reached is no reason not to start: decisions fail open or closed as configured and
        the maintenance loop loads the bans once it answers (a replica rescheduled during
        a Redis outage would otherwise crash-loop). A local store that cannot be opened
        (SQLite's file) stays fatal: there is nothing to reconnect to."""
        try:
            await self.store.open()
            for ban in await self.store.bans(self.clock()):
                self.lists.block.add(ban)
            await self.refresh()
        except Exception as exc:
            if not (getattr(self.store, "shared", False) and is_outage(exc)):
                raise
            self._store_failed("start", exc)
        self._maintenance = asyncio.create_task(self._maintain(maintenance_interval),
                                                name="security-maintenance")

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        await self.store.close()

    async def _maintain(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:
                if is_outage(exc):  # counted and said in one line while it lasts
                    self._store_failed("maintenance", exc)
                else:
                    log.exception("security maintenance failed")

    async def refresh(self) -> None:
        """Expires bans from the index (auditing them) and recounts the active gauges;
        with a shared store, also reloads the bans other replicas made."""
        now = self.clock()
        await self.store.refresh()
        # expired first: a shared store drops expired bans as it lists them, so the list
        # read from it would hold none to audit
        expired = self.lists.block.expire(now)
        if getattr(self.store, "shared", False):
            self.lists.block = CidrSet(await self.store.bans(now))
        for entry in expired:
            await self.store.delete_ban(entry.network)
            self._audit("blocklist.expire", "engine", entry.network, {"reason": entry.reason})
        self.stats.lock_scopes = {lock.key: lock.scope for lock in await self.store.locks(now)}
        self.stats.ban_kinds = {ban.network: ban.source.split(":")[0]
                                for ban in await self.store.bans(now)}

    # --- decisions

    def _keys(self, attempt: Attempt) -> tuple[tuple[int, int, str], Keys]:
        """The parsed address (for the lists) and the keys; the attempt parses it once, and
        keeps its keys for the report that follows a check (1.6-5 µs a pair)."""
        ip = attempt.address
        prefix = self.settings.ipv6_prefix_length
        kept = vars(attempt).get("_keys")
        if kept is not None and kept[0] == prefix:
            return ip, kept[1]
        keys = tracking_keys(attempt.login, prefix_of(ip, prefix))
        vars(attempt)["_keys"] = (prefix, keys)  # frozen: beside the fields, like address
        return ip, keys

    async def check(self, attempt: Attempt) -> Decision:
        """Before the password check: may this login proceed? Raises ValueError on a bad IP."""
        if self.observe is _unobserved:  # its context and attributes would do nothing
            return await self._check(attempt)
        with self.observe("check") as observation:
            decision = await self._check(attempt)
            observation.set("protocol", attempt.protocol_label)
            observation.set("action", decision.action)
            observation.set("reason", decision.reason)
            if decision.reason == "store_unavailable":
                observation.fail("store_unavailable")
            return decision

    async def _check(self, attempt: Attempt) -> Decision:
        start = time.perf_counter()
        ip, keys = self._keys(attempt)
        try:
            decision = await self._decide(ip, keys, attempt)
        except Exception as exc:
            self._store_failed("check", exc)
            if self.settings.fail_open:
                self.stats.fail_open += 1
                decision = Decision("allow", "store_unavailable")
            else:
                decision = Decision("reject", "store_unavailable",
                                    message=self.settings.reject_message)
        self.stats.count(self.stats.decisions, (decision.action, decision.reason))
        self.stats.observe(time.perf_counter() - start)
        return decision

    async def _decide(self, ip: Any, keys: Keys, attempt: Attempt) -> Decision:
        now = self.clock()
        lists = self.lists  # Lists.decide's order, each list asked once
        if lists.trusted.match(ip, now):
            return Decision("allow", "trusted")
        if lists.allow.match(ip, now):
            return Decision("allow", "allowlisted")
        entry = lists.block.last_to_expire(ip, now)  # overlapping bans: when the last ends
        if entry is not None:
            return Decision("reject", "banned", message=self.settings.reject_message,
                            retry_after=_remaining(entry.expires, now))
        s = self.settings
        second_factor = self.second_factor
        # one store call: the locks, the tarpit's count and, with MFA, the user's fields
        # (the account key's login is MFA's user name: both trimmed and lower-cased)
        state = await self.store.login_state(
            keys, now, s.login_attempt_window, s.tarpit_enabled,
            keys.account.removeprefix("a:") if second_factor is not None else None)
        lock = state.lock
        if lock is not None:
            return Decision("reject", "locked" if lock.key == keys.pair else "account_locked",
                            message=s.reject_message, retry_after=lock.until - now)
        decision = ALLOW
        if state.failures:
            delay = min(s.tarpit_max_delay, state.failures * s.tarpit_delay_per_failure)
            decision = Decision("delay", "tarpit", delay=delay)
        if second_factor is not None:
            why = second_factor.second_factor_reason(
                attempt.login, attempt.remote_ip, attempt.device_id, state.mfa or {},
                state.source_failures)
            if why is not None:  # the tarpit's delay still applies
                return Decision("mfa_required", why, delay=decision.delay,
                                message=self.mfa_message)
        return decision

    def _store_failed(self, operation: str, exc: Exception) -> None:
        self.stats.count(self.stats.store_errors, operation)
        log.warning("security store failed", extra={"operation": operation, "error": str(exc)})

    async def report(self, attempt: Attempt, success: bool) -> list[str]:
        """After the password check; returns the actions taken (lock, ban)."""
        if self.observe is _unobserved:  # as in check
            return await self._report(attempt, success)
        with self.observe("report") as observation:
            failures = self.stats.store_errors.get("report", 0.0)
            actions = await self._report(attempt, success)
            observation.set("protocol", attempt.protocol_label)
            observation.set("success", success)
            if actions:
                observation.set("actions", ",".join(actions))
            if self.stats.store_errors.get("report", 0.0) != failures:
                observation.fail("store_unavailable")
            return actions

    async def _report(self, attempt: Attempt, success: bool) -> list[str]:
        ip, keys = self._keys(attempt)
        self.stats.count(self.stats.attempts,
                         (attempt.protocol_label, "success" if success else "failure"))
        subject = f"{attempt.login}@{ip[2]}"
        try:
            if success:
                await self.store.clear_failures(keys.pair)
                self._audit("auth.success", "engine", subject, {"protocol": attempt.protocol})
                return []
            self._audit("auth.failure", "engine", subject, {"protocol": attempt.protocol})
            now = self.clock()
            if self.lists.trusted.match(ip, now) or self.lists.allow.match(ip, now):
                return []
            return await self._count_failure(attempt, ip, keys, now)
        except Exception as exc:
            self._store_failed("report", exc)
            return []

    async def _count_failure(self, attempt: Attempt, ip: Any, keys: Keys,
                             now: float) -> list[str]:
        s = self.settings
        # one store call records the three keys and makes the locks they reach
        counts = await self.store.record_login_failure(keys, attempt.pwhash, now,
                                                       self.lock_policy)
        actions = []
        for lock in counts.locks:
            self.stats.lock_scopes[lock.key] = lock.scope
            self._audit("lockout.lock", "engine",
                        lock.account if not lock.source else f"{lock.account}@{lock.source}",
                        {"scope": lock.scope, "until": lock.until, "level": lock.level,
                         "reason": lock.reason})
            actions.append("lock" if lock.scope == "source_account" else "account_lock")
        source = counts.source
        if s.auto_ban_enabled and source >= s.auto_ban_threshold and self.lists.block.match(
                ip, now) is None:
            window = s.login_attempt_window
            await self.ban(keys.source.removeprefix("s:"),
                           f"{source} distinct wrong passwords in {window:g}s",
                           s.auto_ban_duration, source="automatic", actor="engine")
            await self.store.clear_failures(keys.source)
            actions.append("ban")
        return actions

    # --- administration

    async def lockouts(self) -> list[Lock]:
        return await self.store.locks(self.clock())

    async def unlock(self, account: str, source: str | None = None,
                     actor: str = "admin") -> list[Lock]:
        """Lifts the account's locks (all of them, or only the one for source, given as an
        address or a network)."""
        account = account.strip().lower()
        if source is not None:
            source = str(parse_network(source)) if "/" in source else prefix_of(
                parse_ip(source), self.settings.ipv6_prefix_length)
        removed = []
        for lock in await self.store.locks(self.clock()):
            if lock.account != account:
                continue
            if source is not None and lock.source != source:
                continue
            await self.store.delete_lock(lock.key)
            await self.store.clear_failures(lock.key)
            self.stats.lock_scopes.pop(lock.key, None)
            removed.append(lock)
            self._audit("lockout.unlock", actor,
                        account if not lock.source else f"{account}@{lock.source}",
                        {"scope": lock.scope})
        await self.refresh()
        return removed

    async def ban(self, network: str, reason: str, duration: float | None,
                  source: str = "manual", actor: str = "admin") -> Entry:
        """Blocks a CIDR (an IP is a /32 or /128) for duration seconds, or until unbanned.

        Only an operator's ban (source manual) may replace a ban that lasts longer: an
        automatic, feed or event ban of a network already banned longer (or for good) leaves
        it as it is and returns it. A Stalwart event turned a permanent ban into 6 s.
        Raises ValueError for what is not a network, and for a /0."""
        now = self.clock()
        cidr = str(ban_network(network))
        ban = Entry(cidr, reason, source, now, None if duration is None else now + duration)
        current = self.lists.block.get(cidr)
        if source != "manual" and current is not None and not current.expired(now) and (
                current.expires is None or (
                    ban.expires is not None and current.expires >= ban.expires)):
            return current
        await self.store.put_ban(ban)
        self.lists.block.add(ban)
        self.stats.ban_kinds[cidr] = source.split(":")[0]
        self._audit("blocklist.ban", actor, cidr, {"reason": reason, "source": source,
                                                    "expires": ban.expires})
        return ban

    async def unban(self, network: str, actor: str = "admin") -> Entry | None:
        cidr = str(parse_network(network))
        ban = await self.store.delete_ban(cidr)
        self.lists.block.remove(cidr)
        self.stats.ban_kinds.pop(cidr, None)
        if ban is not None:
            self._audit("blocklist.unban", actor, cidr, {"reason": ban.reason})
            await self.refresh()
        return ban

    async def banned(self) -> list[Entry]:
        return await self.store.bans(self.clock())

    def _audit(self, type_: str, actor: str, subject: str, details: dict[str, Any]) -> None:
        record_audit(self.audit, type_, actor, subject, details)


def lock_policy(settings: Settings) -> LockPolicy:
    """The settings' lockout rules as the store applies them (Store.record_login_failure)."""
    durations = [settings.lock_duration(1)]
    while len(durations) < 64:  # doubling reaches the cap long before (and 2**63 overflows)
        following = settings.lock_duration(len(durations) + 1)
        if following == durations[-1]:
            break
        durations.append(following)
    window = settings.login_attempt_window
    return LockPolicy(window, settings.max_login_attempts, settings.account_lock_threshold,
                      settings.escalation_window, tuple(durations),
                      f"%d distinct wrong passwords in {window:g}s",
                      f"%d distinct wrong passwords from all sources in {window:g}s")


def _remaining(expires: float | None, now: float) -> float:
    return 0.0 if expires is None else max(0.0, expires - now)
