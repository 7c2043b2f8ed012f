"""Benchmark "security": what one login decision costs the security engine, and its memory.

1. inprocess: `await engine.check(attempt)` then `await engine.report(attempt, ok)`
   per login, on the memory store, on the SQLite store (a temp file, default
   flush interval) and on the SQLite store with the audit log, as the exporter
   wires the engine. Baseline in the same rounds: the same coroutine calls into
   a bare dict counter (the floor for any async in-process decision). A few
   component timings (address parsing, audit record, request parsing) show
   where a pair's time goes.
2. http: the real exporter (default SQLite store, audit log on) with
   POST /dovecot/policy?command=allow and ?command=report alternating, driven by
   wrk and a Lua script that varies account, address and pwhash; GET /livez on
   the same server for the same time as the baseline; and, as diagnostics, a
   second exporter whose audit log skips login records and a third on the memory
   store (no write-behind to SQLite), which show those two shares of a request.
   wrk and the server share the machine's cores.
3. memory: bytes per tracked key when N distinct IPv4 source keys go into a
   MemoryStore through record_failure (each measured in a fresh child process
   by RSS growth, and by tracemalloc on a smaller N), the keys one failed login
   creates through the engine's report(), and whether max_tracked_keys bounds the
   store's keys and RSS when far more distinct addresses arrive.
4. redis: the same check+report pairs in process on a real Redis (with the MFA
   manager attached, as the exporter wires it by default), the store as the
   exporter builds it against the baseline in the same rounds: the decision
   path's store calls one by one, as the engine made them before it read and
   wrote through one script per check and one per wrong password. Also redis-py
   client variants (the other parser, RESP3) and 8 pairs at once (like one wrk
   with 8 connections). Per pair: wall time, this process's CPU time, and the
   round trips Redis answered (its total_writes_processed). The HTTP part (2.)
   also runs an exporter on this Redis.

Run: .venv/bin/python benchmarks/bench_security.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import inspect
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import tracemalloc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import (
    ROOT,
    event_loop_runner,
    free_port,
    ratio,
    say,
    stop,
    summary,
    wait_for_port,
    write_result,
)

from exporter.config import load_config, parse_duration
from security.attempts import Attempt, Decision, Keys, parse_address, parse_ip, tracking_keys
from security.audit import AuditLog
from security.blocklist import prefix_of
from security.engine import SecurityManager
from security.protocols import dovecot
from security.settings import Settings
from security.store import FailureCounts, LockPolicy, LoginState, open_store
from security.store.memory import MemoryStore
from security.store.redis import RedisStore
from security.store.sqlite import SqliteStore

sys.path.insert(0, str(ROOT))
from tests.integration.components import Redis  # noqa: E402 - a plain class, no pytest

TARGET_PAIR_US = 20.0
TARGET_DECISIONS_PER_S = 5_000.0
TARGET_P99_MS = 5.0
TARGET_LIVEZ_SHARE = 0.5
TARGET_BYTES_PER_KEY = 300.0
# A bounded store stops growing once full: after that, each further address may add at
# most this share of a tracked key's cost to RSS (noise and fragmentation), not a leak.
BOUNDED_GROWTH_SHARE = 0.10

# The workload, shared by the in-process part and the Lua script (see Workload).
V4_NET = "198.18.0.0/15"  # RFC 2544's benchmarking range: 131,072 addresses
V4_SIZE = 1 << 17
V6_NET = "2001:db8::/32"  # documentation range; a random /64 and host per attempt
V6_SHARE = 0.10
ACCOUNTS = 10_000
SUCCESS_SHARE = 0.70
RETRY_SHARE = 0.10  # attempts that retry a recent failure's account and address
RETRY_SUCCESS_SHARE = 0.50
RECENT_FAILURES = 1_000

# The thresholds the config schema allows at most, and nothing trusted: every
# attempt is counted, and with the key spread above nothing locks or bans.
CONFIG = """\
security:
  trusted_networks: []
  max_login_attempts: 100
  lockout:
    account_lock_threshold: 100
  auto_ban:
    threshold: 200
"""
CONFIG_NO_LOGIN_AUDIT = CONFIG + """\
  audit_config:
    log_successful_auth: false
    log_failed_auth: false
"""
CONFIG_MEMORY_STORE = CONFIG + """\
  store:
    type: memory
"""


@dataclass
class Mode:
    pairs: int  # in-process logins per candidate per round
    rounds: int
    component_number: int
    component_rounds: int
    http_rounds: int
    http_seconds: int
    http_warmup_seconds: int
    memory_keys: int
    tracemalloc_keys: int
    engine_logins: int
    bounded_addresses: int
    bounded_max_keys: int
    redis_pairs: int
    redis_rounds: int


FULL = Mode(pairs=30_000, rounds=12, component_number=20_000, component_rounds=5,
            http_rounds=3, http_seconds=12, http_warmup_seconds=2, memory_keys=1_000_000,
            tracemalloc_keys=100_000, engine_logins=100_000, bounded_addresses=1_000_000,
            bounded_max_keys=100_000, redis_pairs=4_000, redis_rounds=6)
# Quick stays under 40 s; its HTTP figures come from 2 s runs.
QUICK = Mode(pairs=4_000, rounds=3, component_number=3_000, component_rounds=2,
             http_rounds=1, http_seconds=2, http_warmup_seconds=1, memory_keys=100_000,
             tracemalloc_keys=20_000, engine_logins=20_000, bounded_addresses=200_000,
             bounded_max_keys=20_000, redis_pairs=600, redis_rounds=3)

WORKLOAD_NOTE = (
    f"{ACCOUNTS:,} accounts; addresses {1 - V6_SHARE:.0%} IPv4 from {V4_NET} ({V4_SIZE:,} "
    f"addresses) and {V6_SHARE:.0%} IPv6 from {V6_NET} (random /64 and host); "
    f"{1 - RETRY_SHARE:.0%} of logins are fresh (a random account and address, "
    f"{SUCCESS_SHARE:.0%} succeed with the account's one pwhash, the rest fail with a random "
    f"8-hex-digit pwhash) and {RETRY_SHARE:.0%} retry the account and address of one of the "
    f"last {RECENT_FAILURES:,} failures with a new pwhash ({RETRY_SUCCESS_SHARE:.0%} succeed), "
    "so those pairs get tarpit answers; security.trusted_networks: [], max_login_attempts 100, "
    "account_lock_threshold 100, auto_ban threshold 200 (the schema's maxima), everything else "
    "default")


def correct_pwhash(account: int) -> str:
    return f"{account * 7919 % 2147483647:08x}"


class Workload:
    """Login attempts as a busy mail host sees them; the Lua script mirrors this."""

    def __init__(self, seed: int):
        self.rnd = random.Random(seed)
        self.recent: collections.deque[tuple[int, str]] = collections.deque(
            maxlen=RECENT_FAILURES)
        self.sessions = 0

    def address(self) -> str:
        rnd = self.rnd
        if rnd.random() < V6_SHARE:
            return (f"2001:db8:{rnd.randrange(65536):x}:{rnd.randrange(65536):x}::"
                    f"{rnd.randrange(1, 65536):x}")
        v = rnd.randrange(V4_SIZE)
        return f"198.{18 + (v >> 16)}.{(v >> 8) & 255}.{v & 255}"

    def batch(self, n: int) -> list[tuple[Attempt, bool]]:
        rnd, out = self.rnd, []
        for _ in range(n):
            if self.recent and rnd.random() < RETRY_SHARE:
                account, ip = self.recent[rnd.randrange(len(self.recent))]
                success = rnd.random() < RETRY_SUCCESS_SHARE
            else:
                account, ip = rnd.randrange(ACCOUNTS), self.address()
                success = rnd.random() < SUCCESS_SHARE
            pwhash = correct_pwhash(account) if success else f"{rnd.getrandbits(32):08x}"
            if not success:
                self.recent.append((account, ip))
            self.sessions += 1
            out.append((Attempt(f"user{account}@example.org", ip, "imap", True,
                                f"bench{self.sessions}", pwhash), success))
        return out


# --- 1. in-process ---------------------------------------------------------------------


ALLOW = Decision("allow", "ok")
DELAY = Decision("delay", "tarpit", delay=1.0)


class DictFloor:
    """The baseline: the same two awaited calls per login into one dict, nothing else."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}

    async def check(self, attempt: Attempt) -> Decision:
        return DELAY if self.failures.get(attempt.remote_ip) else ALLOW

    async def report(self, attempt: Attempt, success: bool) -> list[str]:
        if success:
            self.failures.pop(attempt.remote_ip, None)
        else:
            self.failures[attempt.remote_ip] = self.failures.get(attempt.remote_ip, 0) + 1
        return []


async def drive(target: Any, items: list[tuple[Attempt, bool]]) -> tuple[float, list[Decision]]:
    """Seconds for check+report over every item, and the decisions, for the mix."""
    decisions: list[Decision] = []
    append = decisions.append
    check, report = target.check, target.report
    start = time.perf_counter()
    for attempt, success in items:
        append(await check(attempt))
        await report(attempt, success)
    return time.perf_counter() - start, decisions


@dataclass
class Candidate:
    name: str
    label: str
    target: Any
    flush: Callable[[], Coroutine[Any, Any, None]] | None = None
    seconds: list[float] = field(default_factory=list)
    flush_seconds: list[float] = field(default_factory=list)
    decisions: collections.Counter[str] = field(default_factory=collections.Counter)


def settings_from(config_text: str, directory: Path) -> tuple[Settings, dict[str, Any]]:
    path = directory / "bench-security.yaml"
    path.write_text(config_text, encoding="utf-8")
    security = load_config(str(path))["security"]
    return Settings.from_config(security, parse_duration), security


def sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Runs a coroutine that never suspends (the memory store's), without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


def where(fn: Any) -> str:
    """file:line of a function, so the table names the code it timed as it is today."""
    fn = inspect.unwrap(fn)
    return f"{Path(inspect.getsourcefile(fn) or '?').relative_to(ROOT)}:" \
           f"{inspect.getsourcelines(fn)[1]}"


async def bench_components(mode: Mode, settings: Settings, tmp: Path) -> dict[str, Any]:
    """ns per call of the pieces a check+report pair is made of (diagnostic)."""
    engine = SecurityManager(settings, MemoryStore())
    audit = AuditLog(tmp / "components-audit")
    a4 = Attempt("user1@example.org", "198.18.3.4", "imap", True, "s1", "0badf00d")
    a6 = Attempt("user1@example.org", "2001:db8:5:6::7", "imap", True, "s2", "0badf00d")
    now = time.time()
    body = json.dumps({"login": a4.login, "remote": a4.remote_ip, "pwhash": a4.pwhash,
                       "protocol": "imap", "session_id": "s1", "tls": True,
                       "success": False}).encode()
    env = {"engine": engine, "audit": audit, "a4": a4, "a6": a6, "now": now, "body": body,
           "sync": sync, "parse_ip": parse_ip, "parse_address": parse_address,
           "prefix_of": prefix_of, "tracking_keys": tracking_keys, "dovecot": dovecot,
           "allow": Decision("allow", "ok")}
    # a4 and a6 keep their parsed address (Attempt.address), as one attempt does between
    # check and report; the parse_address rows show what the first use costs.
    cases = {
        "engine.check, memory store": ("sync(engine.check(a4))", SecurityManager.check),
        "engine.report failure, memory store (no audit)": ("sync(engine.report(a4, False))",
                                                           SecurityManager.report),
        "engine.report success, memory store (no audit)": ("sync(engine.report(a4, True))",
                                                           SecurityManager.report),
        "engine._keys, IPv4 (address already parsed)": ("engine._keys(a4)",
                                                        SecurityManager._keys),
        "engine._keys, IPv6 (address already parsed)": ("engine._keys(a6)",
                                                        SecurityManager._keys),
        "parse_address, IPv4 (inet_pton; once per attempt)": ("parse_address(a4.remote_ip)",
                                                               parse_address),
        "parse_address, IPv6 (inet_pton; once per attempt)": ("parse_address(a6.remote_ip)",
                                                               parse_address),
        "parse_ip, IPv4 (ipaddress.ip_address, the path before)": ("parse_ip(a4.remote_ip)",
                                                                    parse_ip),
        "prefix_of, parsed IPv4 address": ("prefix_of(a4.address, 64)", prefix_of),
        "tracking_keys": ("tracking_keys(a4.login, '198.18.3.4/32')", tracking_keys),
        "CidrSet.match, empty list (check asks three, report two)": (
            "engine.lists.allow.match(a4.address, now)", type(engine.lists.allow).match),
        "AuditLog.append auth.failure (every report, when audited)": (
            "audit.append('auth.failure', 'engine', 'user1@example.org@198.18.3.4', "
            "{'protocol': 'imap'})", AuditLog.append),
        "dovecot.parse_request, report body (parses the address)": (
            "dovecot.parse_request('report', body)", dovecot.parse_request),
        "dovecot.answer_body, allow": ("dovecot.answer_body(allow)", dovecot.answer_body),
    }
    timers = {name: timeit.Timer(stmt, globals=env) for name, (stmt, _) in cases.items()}
    for timer in timers.values():
        timer.timeit(200)
    ns: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for rnd in range(mode.component_rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            ns[name].append(timers[name].timeit(mode.component_number)
                            / mode.component_number * 1e9)
    audit.close()
    out = {name: {"statement": cases[name][0], "where": where(cases[name][1]),
                  "ns_per_call": summary(ns[name])} for name in cases}
    for name, row in out.items():
        say(f"component {name}: {row['ns_per_call']['median']:.0f} ns")
    return {"number": mode.component_number, "rounds": mode.component_rounds, "cases": out}


async def bench_inprocess(mode: Mode, tmp: Path) -> dict[str, Any]:
    settings, security = settings_from(CONFIG, tmp)
    max_keys = security["store"]["max_tracked_keys"]
    flush_interval = parse_duration(security["store"]["flush_interval"])
    sqlite_store = open_store("sqlite", path=str(tmp / "inprocess" / "security.db"),
                              max_keys=max_keys, flush_interval=flush_interval)
    audited_store = open_store("sqlite", path=str(tmp / "inprocess-audit" / "security.db"),
                               max_keys=max_keys, flush_interval=flush_interval)
    audit = AuditLog(tmp / "inprocess-audit")
    engines = {
        "memory": SecurityManager(settings, open_store("memory", max_keys=max_keys)),
        "sqlite": SecurityManager(settings, sqlite_store),
        "sqlite_audit": SecurityManager(settings, audited_store, audit),
    }
    for engine in engines.values():
        await engine.store.open()
    candidates = [
        Candidate("floor", "dict counter keyed by address, same awaited calls (baseline)",
                  DictFloor()),
        Candidate("memory", "engine, memory store", engines["memory"]),
        Candidate("sqlite", "engine, SQLite store", engines["sqlite"],
                  flush=sqlite_store.flush),  # type: ignore[attr-defined]
        Candidate("sqlite_audit", "engine, SQLite store + audit log (the exporter's wiring)",
                  engines["sqlite_audit"], flush=audited_store.flush),  # type: ignore[attr-defined]
    ]
    workload = Workload(seed=2026)
    warm = workload.batch(2_000)
    for cand in candidates:
        await drive(cand.target, warm)
        if cand.flush:
            await cand.flush()
    for rnd in range(mode.rounds):
        items = workload.batch(mode.pairs)
        shift = rnd % len(candidates)
        for cand in candidates[shift:] + candidates[:shift]:
            gc.collect()
            seconds, decisions = await drive(cand.target, items)
            cand.seconds.append(seconds)
            cand.decisions.update(f"{d.action}/{d.reason}" for d in decisions)
            if cand.flush:
                # The timed loop never yields, so the background flusher cannot run inside
                # it: flush here, timed apart, so its loop-thread cost is not lost.
                start = time.perf_counter()
                await cand.flush()
                cand.flush_seconds.append(time.perf_counter() - start)
            await asyncio.sleep(0)
    tracked = {name: engine.store.tracked_keys() for name, engine in engines.items()}
    for engine in engines.values():
        await engine.store.close()
    audit.close()

    result: dict[str, Any] = {
        "pairs_per_round": mode.pairs, "rounds": mode.rounds, "workload": WORKLOAD_NOTE,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "tracked_keys_at_end": tracked, "candidates": {},
    }
    for cand in candidates:
        us = [s / mode.pairs * 1e6 for s in cand.seconds]
        entry: dict[str, Any] = {"label": cand.label, "us_per_pair": summary(us),
                                 "pairs_per_second": mode.pairs / statistics.median(cand.seconds),
                                 "decisions": dict(cand.decisions.most_common())}
        if cand.flush:
            flush_us = [s / mode.pairs * 1e6 for s in cand.flush_seconds]
            entry["flush_us_per_pair"] = summary(flush_us)
            entry["us_per_pair_with_flush"] = summary([a + b for a, b in zip(us, flush_us,
                                                                             strict=True)])
        result["candidates"][cand.name] = entry
        say(f"inprocess {cand.name}: {entry['us_per_pair']['median']:.2f} us per pair "
            f"({entry['us_per_pair']['min']:.2f}-{entry['us_per_pair']['max']:.2f})"
            + (f", flush {entry['flush_us_per_pair']['median']:.2f} us per pair"
               if cand.flush else ""))
    med = {name: c["us_per_pair"]["median"] for name, c in result["candidates"].items()}
    result["ratios"] = {
        "memory/floor": ratio(med["memory"], med["floor"]),
        "sqlite/memory": ratio(med["sqlite"], med["memory"]),
        "sqlite_with_flush/memory": ratio(
            result["candidates"]["sqlite"]["us_per_pair_with_flush"]["median"], med["memory"]),
        "sqlite_audit/sqlite": ratio(med["sqlite_audit"], med["sqlite"]),
    }
    result["components"] = await bench_components(mode, settings, tmp)
    return result


# --- 2. http ---------------------------------------------------------------------------


LUA = f"""\
-- written by benchmarks/bench_security.py: alternates command=allow and command=report,
-- one attempt per pair, with the same workload as the in-process part.
local counter, account, login, ip, pw, ok = 0, 0, "", "", "", false
local recent, nrecent = {{}}, 0
local threads = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  -- each wrk thread its own sequence, else both would send the same attempts
  math.randomseed(tonumber(args[1] or "1") * 1000 + tid)
end

local function address()
  if math.random() < {V6_SHARE} then
    return string.format("2001:db8:%x:%x::%x", math.random(0, 65535), math.random(0, 65535),
                         math.random(1, 65535))
  end
  local v = math.random(0, {V4_SIZE} - 1)
  return string.format("198.%d.%d.%d", 18 + math.floor(v / 65536), math.floor(v / 256) % 256,
                       v % 256)
end

local function next_attempt()
  if nrecent > 0 and math.random() < {RETRY_SHARE} then
    local r = recent[math.random(1, nrecent)]
    account, ip = r[1], r[2]
    ok = math.random() < {RETRY_SUCCESS_SHARE}
  else
    account, ip = math.random(0, {ACCOUNTS} - 1), address()
    ok = math.random() < {SUCCESS_SHARE}
  end
  login = "user" .. account .. "@example.org"
  if ok then
    pw = string.format("%08x", (account * 7919) % 2147483647)
  else
    pw = string.format("%08x", math.random(0, 2147483646))
    if nrecent < {RECENT_FAILURES} then
      nrecent = nrecent + 1
      recent[nrecent] = {{account, ip}}
    else
      recent[math.random(1, nrecent)] = {{account, ip}}
    end
  end
end

function request()
  counter = counter + 1
  if counter % 2 == 1 then
    next_attempt()
  end
  local fields = string.format(
    '"login":"%s","remote":"%s","pwhash":"%s","protocol":"imap","session_id":"w%d","tls":true',
    login, ip, pw, math.floor((counter + 1) / 2))
  if counter % 2 == 1 then
    return wrk.format(nil, "/dovecot/policy?command=allow", nil, "{{" .. fields .. "}}")
  end
  return wrk.format(nil, "/dovecot/policy?command=report", nil,
                    "{{" .. fields .. ',"success":' .. (ok and "true" or "false") .. "}}")
end
"""

WRK_THREADS, WRK_CONNECTIONS = 2, 32
# A second, smaller closed loop for the policy endpoint. A closed loop of N connections
# waits at least N / throughput per request; a Dovecot auth process has as many policy
# requests in flight as logins being authenticated, which at 5,000 decisions/s and about
# a millisecond each is about 5 (Little's law), so 8 connections is the busy-server case.
FEW_CONNECTIONS = 8
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNIT_MS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures of one `wrk --latency` run; fails loudly if the output is not wrk's."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    latency = {f"p{p}_ms": _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", text,
                                                         re.MULTILINE)}
    stats = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)", text, re.MULTILINE)
    if stats is not None:
        latency["mean_ms"], latency["max_ms"] = _ms(stats.group(1)), _ms(stats.group(3))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    return {"requests_per_second": float(rps.group(1)), "requests": int(total.group(1)),
            **latency, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0}


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    state_dir: Path
    log: Path
    redis_pid: int | None = None  # the Redis its store is on, whose CPU is read too


def start_server(name: str, config_text: str, tmp: Path) -> Server:
    state = tmp / f"server-{name}"
    state.mkdir()
    config = state / "config.yaml"
    config.write_text(config_text, encoding="utf-8")
    port, log = free_port(), state / "exporter.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "run", "--listen", f"127.0.0.1:{port}",
             "--state-dir", str(state), "--config", str(config)],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    return Server(name, port, proc, state, log)


def main_thread_cpu(proc: psutil.Process) -> float:
    """CPU seconds of the process's main thread (its thread id is the process id)."""
    thread = next(t for t in proc.threads() if t.id == proc.pid)
    return float(thread.user_time + thread.system_time)


def run_wrk(url: str, seconds: int, server: Server, script: Path | None,
            seed: int, connections: int = WRK_CONNECTIONS) -> dict[str, Any]:
    """One wrk run, with the server's and wrk's CPU time over it."""
    command = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency",
               *(["-s", str(script)] if script else []), url,
               *(["--", str(seed)] if script else [])]
    proc = psutil.Process(server.proc.pid)
    redis = psutil.Process(server.redis_pid) if server.redis_pid else None
    redis_cpu = sum(redis.cpu_times()[:2]) if redis else 0.0
    server_cpu = sum(proc.cpu_times()[:2])
    main_cpu = main_thread_cpu(proc)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.monotonic() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse_wrk(done.stdout)
    result["redis_cpu_percent_of_core"] = ((sum(redis.cpu_times()[:2]) - redis_cpu) / wall * 100
                                           if redis else 0.0)
    result["server_cpu_percent_of_core"] = (sum(proc.cpu_times()[:2]) - server_cpu) / wall * 100
    # the event loop's thread; the rest is the SQLite store's worker and other helpers
    result["server_main_thread_cpu_percent_of_core"] = (main_thread_cpu(proc) - main_cpu
                                                        ) / wall * 100
    result["wrk_cpu_percent_of_core"] = ((after.ru_utime + after.ru_stime) - (
        children.ru_utime + children.ru_stime)) / wall * 100
    result["server_cpu_us_per_request"] = (result["server_cpu_percent_of_core"] / 100 * wall
                                           / max(1, result["requests"]) * 1e6)
    return result


def security_metrics(port: int) -> dict[str, Any]:
    """Decision mix and counters from the server's own /metrics after the load."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics",
                     headers={"accept": "text/plain;version=0.0.4"}, timeout=30).text
    out: dict[str, Any] = {"decisions": {}, "attempts": {}}
    for action, reason, value in re.findall(
            r'^a3mailer_security_decisions_total\{action="([^"]+)",reason="([^"]+)"\} (\S+)',
            text, re.MULTILINE):
        out["decisions"][f"{action}/{reason}"] = float(value)
    for protocol, res, value in re.findall(
            r'^a3mailer_security_attempts_total\{protocol="([^"]+)",result="([^"]+)"\} (\S+)',
            text, re.MULTILINE):
        out["attempts"][f"{protocol}/{res}"] = float(value)
    for name in ("a3mailer_security_tracked_keys", "a3mailer_security_store_errors_total",
                 "a3mailer_security_active_lockouts", "a3mailer_security_active_bans"):
        values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.MULTILINE)
        out[name.removeprefix("a3mailer_security_")] = sum(float(v) for v in values)
    return out


def bench_http(mode: Mode, servers: dict[str, Server], tmp: Path) -> dict[str, Any]:
    script = tmp / "dovecot-policy.lua"
    script.write_text(LUA, encoding="utf-8")
    default, no_audit = servers["default"], servers["no_login_audit"]
    policy_url = f"http://127.0.0.1:{default.port}"
    cases: dict[str, tuple[Server, str, Path | None, int]] = {
        "dovecot_policy": (default, policy_url, script, WRK_CONNECTIONS),
        "livez": (default, f"{policy_url}/livez", None, WRK_CONNECTIONS),
        "dovecot_policy_no_login_audit": (no_audit, f"http://127.0.0.1:{no_audit.port}",
                                          script, WRK_CONNECTIONS),
        f"dovecot_policy_{FEW_CONNECTIONS}_connections": (default, policy_url, script,
                                                          FEW_CONNECTIONS),
    }
    if "memory_store" in servers:  # the default config on the memory store
        cases["dovecot_policy_memory_store"] = (
            servers["memory_store"], f"http://127.0.0.1:{servers['memory_store'].port}", script,
            WRK_CONNECTIONS)
    if "redis" in servers:  # the same server on the Redis store
        cases["dovecot_policy_redis"] = (servers["redis"],
                                         f"http://127.0.0.1:{servers['redis'].port}", script,
                                         WRK_CONNECTIONS)
    for name, (server, url, lua, conns) in cases.items():  # warm-up: first requests
        run_wrk(url, mode.http_warmup_seconds, server, lua, seed=1, connections=conns)
        say(f"http warm-up {name} done")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    names = list(cases)
    for rnd in range(mode.http_rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            server, url, lua, conns = cases[name]
            run = run_wrk(url, mode.http_seconds, server, lua, seed=100 + rnd, connections=conns)
            runs[name].append(run)
            say(f"http round {rnd + 1} {name}: {run['requests_per_second']:.0f} req/s, "
                f"p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms, "
                f"non-2xx {run['non_2xx']}, server {run['server_cpu_percent_of_core']:.0f} % "
                f"of a core, wrk {run['wrk_cpu_percent_of_core']:.0f} %")
    result: dict[str, Any] = {
        "rounds": mode.http_rounds, "seconds_per_run": mode.http_seconds,
        "warmup_seconds": mode.http_warmup_seconds, "threads": WRK_THREADS,
        "connections": WRK_CONNECTIONS, "cores": os.cpu_count(),
        "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True,
                              check=False).stdout.split(" [")[0].strip(),
        "cases": {},
    }
    for name, case_runs in runs.items():
        entry: dict[str, Any] = {
            key: summary([r[key] for r in case_runs])
            for key in ("requests_per_second", "mean_ms", "p50_ms", "p75_ms", "p90_ms", "p99_ms",
                        "max_ms",
                        "server_cpu_percent_of_core", "server_main_thread_cpu_percent_of_core",
                        "wrk_cpu_percent_of_core", "redis_cpu_percent_of_core",
                        "server_cpu_us_per_request")}
        # A closed loop of N connections waits N / throughput per request on average,
        # whatever the server does: the floor under the mean (and so under p50/p99).
        entry["connections"] = cases[name][3]
        entry["queueing_mean_ms"] = (entry["connections"] / entry["requests_per_second"]["median"]
                                     * 1e3)
        entry["requests"] = sum(r["requests"] for r in case_runs)
        entry["non_2xx"] = sum(r["non_2xx"] for r in case_runs)
        entry["socket_errors"] = sum(r["socket_errors"] for r in case_runs)
        result["cases"][name] = entry
    med = {name: c["requests_per_second"]["median"] for name, c in result["cases"].items()}
    result["ratios"] = {
        "dovecot_policy/livez": ratio(med["dovecot_policy"], med["livez"]),
        "dovecot_policy_no_login_audit/livez": ratio(med["dovecot_policy_no_login_audit"],
                                                     med["livez"]),
        "dovecot_policy/dovecot_policy_no_login_audit": ratio(
            med["dovecot_policy"], med["dovecot_policy_no_login_audit"]),
    }
    if "dovecot_policy_memory_store" in med:
        result["ratios"]["dovecot_policy/dovecot_policy_memory_store"] = ratio(
            med["dovecot_policy"], med["dovecot_policy_memory_store"])
    if "dovecot_policy_redis" in med:
        result["ratios"]["dovecot_policy_redis/dovecot_policy"] = ratio(
            med["dovecot_policy_redis"], med["dovecot_policy"])
    result["server_metrics"] = {name: security_metrics(server.port)
                                for name, server in servers.items()}
    result["server_rss_mb"] = {name: psutil.Process(server.proc.pid).memory_info().rss / 2**20
                               for name, server in servers.items()}
    return result


# --- 3. memory -------------------------------------------------------------------------


def ipv4_key(i: int) -> str:
    """The engine's source key of the i-th address from 10.0.0.0 on."""
    v = (10 << 24) + i
    return f"s:{v >> 24}.{(v >> 16) & 255}.{(v >> 8) & 255}.{v & 255}/32"


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def memory_store_child(n: int, max_keys: int, trace: bool,
                             sqlite: bool = False) -> dict[str, Any]:
    """N distinct source keys through record_failure, in a fresh process.

    With sqlite, the SQLite store (the default backend), whose flush() drains
    `dirty`; it is awaited at every checkpoint, standing in for its 1 s timer.
    """
    workdir = tempfile.TemporaryDirectory(prefix="bench-security-store-")
    store: MemoryStore = (SqliteStore(Path(workdir.name) / "security.db", max_keys=max_keys)
                          if sqlite else MemoryStore(max_keys=max_keys))
    await store.open()
    now, window = time.time(), 300.0
    if trace:
        tracemalloc.start()
    base_rss = rss()
    base_traced = tracemalloc.get_traced_memory()[0] if trace else 0
    checkpoints = []
    step = max(1, n // 10)
    start = time.perf_counter()
    for i in range(n):
        # the key and pwhash are made here, so the store holds the only references
        await store.record_failure(ipv4_key(i), f"{i * 2654435761 & 0xFFFFFFFF:08x}", now,
                                   window)
        if (i + 1) % step == 0:
            if isinstance(store, SqliteStore):
                await store.flush()
            checkpoints.append({"inserted": i + 1, "rss_growth_mb": (rss() - base_rss) / 2**20,
                                "tracked_keys": store.tracked_keys()})
    seconds = time.perf_counter() - start
    grown = rss() - base_rss
    out: dict[str, Any] = {
        "inserted": n, "max_keys": max_keys, "tracked_keys": store.tracked_keys(),
        "dirty_keys": len(store.dirty), "rss_growth_bytes": grown,
        "rss_bytes_per_tracked_key": grown / store.tracked_keys(),
        "us_per_insert": seconds / n * 1e6, "checkpoints": checkpoints,
    }
    if trace:
        traced = tracemalloc.get_traced_memory()[0] - base_traced
        tracemalloc.stop()
        out["traced_bytes_per_tracked_key"] = traced / store.tracked_keys()
    # What one entry is made of (sys.getsizeof; containers' own slots are the rest).
    key = next(iter(store._failures))  # noqa: SLF001 - a benchmark may look inside
    seen = store._failures[key]  # noqa: SLF001
    pwhash, ts = seen if isinstance(seen, tuple) else next(iter(seen.items()))
    out["entry_parts_bytes"] = {"key str": sys.getsizeof(key),
                                f"entry {type(seen).__name__} (one failure)": sys.getsizeof(seen),
                                "pwhash str": sys.getsizeof(pwhash), "ts float": sys.getsizeof(ts),
                                "dict {pwhash: ts} (from the second distinct password)":
                                    sys.getsizeof({pwhash: ts, f"{pwhash}2": ts})}
    store.dirty.clear()
    out["rss_growth_bytes_after_clearing_dirty"] = rss() - base_rss
    await store.close()
    workdir.cleanup()
    return out


async def memory_engine_child(n: int) -> dict[str, Any]:
    """N failed logins, each a distinct account and address, through engine.report()."""
    settings = Settings(trusted_networks=(), max_login_attempts=100, account_lock_threshold=100,
                        auto_ban_threshold=200)
    engine = SecurityManager(settings, MemoryStore(max_keys=4 * n))
    base_rss = rss()
    start = time.perf_counter()
    for i in range(n):
        ip = ipv4_key(i)[2:-3]
        await engine.report(Attempt(f"user{i}@example.org", ip, "imap", True, "",
                                    f"{i * 2654435761 & 0xFFFFFFFF:08x}"), False)
    seconds = time.perf_counter() - start
    grown = rss() - base_rss
    keys = engine.store.tracked_keys()
    return {"failed_logins": n, "tracked_keys": keys, "keys_per_failed_login": keys / n,
            "rss_growth_bytes": grown, "rss_bytes_per_failed_login": grown / n,
            "rss_bytes_per_tracked_key": grown / keys,
            "dirty_keys": len(engine.store.dirty),  # type: ignore[attr-defined]
            "us_per_report": seconds / n * 1e6}


def memory_child(args: list[str]) -> int:
    kind, n, max_keys = args[0], int(args[1]), int(args[2])
    if kind == "engine":
        result = asyncio.run(memory_engine_child(n))
    else:
        result = asyncio.run(memory_store_child(n, max_keys, trace=kind == "store-traced",
                                                sqlite=kind == "sqlite"))
    print(json.dumps(result))
    return 0


def child(kind: str, n: int, max_keys: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(n),
                           str(max_keys)], cwd=ROOT, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def bench_memory(mode: Mode) -> dict[str, Any]:
    n = mode.memory_keys
    per_key = child("store", n, n + 1)
    say(f"memory: {n:,} keys, {per_key['rss_bytes_per_tracked_key']:.0f} bytes per tracked key "
        f"(RSS), {per_key['us_per_insert']:.2f} us per insert")
    traced = child("store-traced", mode.tracemalloc_keys, mode.tracemalloc_keys + 1)
    say(f"memory: tracemalloc at {mode.tracemalloc_keys:,} keys: "
        f"{traced['traced_bytes_per_tracked_key']:.0f} bytes per key")
    engine = child("engine", mode.engine_logins, 0)
    say(f"memory: engine.report, {engine['keys_per_failed_login']:.2f} keys and "
        f"{engine['rss_bytes_per_failed_login']:.0f} bytes per failed login")
    bounded = {kind: child(kind, mode.bounded_addresses, mode.bounded_max_keys)
               for kind in ("store", "sqlite")}
    for kind, case in bounded.items():
        cps = case["checkpoints"]
        half = next(c for c in cps if c["inserted"] >= mode.bounded_addresses // 2)
        case["rss_growth_mb_first_half"] = half["rss_growth_mb"]
        case["rss_growth_mb_second_half"] = cps[-1]["rss_growth_mb"] - half["rss_growth_mb"]
        case["rss_bytes_per_address_second_half"] = (
            case["rss_growth_mb_second_half"] * 2**20 / (cps[-1]["inserted"] - half["inserted"]))
        say(f"memory: {kind} bounded at {mode.bounded_max_keys:,} keys after "
            f"{mode.bounded_addresses:,} addresses: {case['tracked_keys']:,} keys, "
            f"{case['dirty_keys']:,} dirty, RSS +{case['rss_growth_bytes'] / 2**20:.1f} MB "
            f"(second half +{case['rss_growth_mb_second_half']:.1f} MB)")
    return {"per_key": per_key, "traced": traced, "engine": engine,
            "bounded": bounded["store"], "bounded_sqlite": bounded["sqlite"],
            "method": "record_failure called directly on a MemoryStore (the SqliteStore in "
                      "the last row), one distinct IPv4 source key (s:10.x.x.x/32) and pwhash "
                      "per call, except the engine row; each case in a fresh child process; "
                      "RSS (psutil, after gc.collect()) growth over the inserts divided by the "
                      "keys the store holds"}


# --- 4. Redis --------------------------------------------------------------------------


class PerCallRedisStore(RedisStore):
    """The baseline: the decision path's store calls one by one on Redis (get_lock twice,
    failure_count, mfa_fields; get_lock and three record_failure scripts, and a lock's
    bump_offences, put_lock and clear_failures), as the engine made them before one script
    per check and one per wrong password: the memory store's composition of those calls, as
    it was before it read its own dicts directly."""

    _make_lock = MemoryStore._make_lock

    async def login_state(self, keys: Keys, now: float, window: float, failures: bool,
                          mfa_user: str | None) -> LoginState:
        lock = await self.get_lock(keys.pair, now) or await self.get_lock(keys.account, now)
        if lock is not None:
            return LoginState(lock, 0, None, 0)
        count = await self.failure_count(keys.pair, now, window) if failures else 0
        if mfa_user is None:
            return LoginState(None, count, None, 0)
        fields = await self.mfa_fields(mfa_user)
        source = await self.failure_count(keys.source, now, window) if fields else 0
        return LoginState(None, count, fields, source)

    async def record_login_failure(self, keys: Keys, pwhash: str, now: float,
                                   policy: LockPolicy) -> FailureCounts:
        window = policy.window
        pair_locked = await self.get_lock(keys.pair, now) is not None
        pair = await self.record_failure(keys.pair, pwhash, now, window)
        account = 0 if pair_locked else await self.record_failure(keys.account, pwhash, now,
                                                                  window)
        source = await self.record_failure(keys.source, pwhash, now, window)
        login, network = keys.account.removeprefix("a:"), keys.source.removeprefix("s:")
        locks = []
        if pair >= policy.pair_threshold and not pair_locked:
            locks.append(await self._make_lock(keys.pair, "source_account", login, network,
                                               now, policy.pair_reason % pair, policy))
        if account >= policy.account_threshold and await self.get_lock(keys.account,
                                                                       now) is None:
            locks.append(await self._make_lock(keys.account, "account", login, "", now,
                                               policy.account_reason % account, policy))
        return FailureCounts(pair, account, source, tuple(locks))


def redis_variants() -> dict[str, tuple[str, type[RedisStore], dict[str, Any], int]]:
    """name -> (label, store class, redis-py client options, pairs at once)."""
    from redis._parsers import _AsyncRESP2Parser
    from redis.utils import HIREDIS_AVAILABLE

    default_parser = "hiredis" if HIREDIS_AVAILABLE else "Python (RESP2)"
    out = {
        "redis_per_call": (f"store calls one by one, as before (baseline; {default_parser} "
                           "parser)", PerCallRedisStore, {}, 1),
        "redis": (f"one script per check and per wrong password ({default_parser} parser)",
                  RedisStore, {}, 1),
        "redis_resp3": ("the same, RESP3 (protocol=3)", RedisStore, {"protocol": 3}, 1),
        "redis_per_call_8": ("store calls one by one, 8 pairs at once", PerCallRedisStore,
                             {}, 8),
        "redis_8": ("one script per call, 8 pairs at once", RedisStore, {}, 8),
    }
    if HIREDIS_AVAILABLE:  # else the default is the Python parser already
        out["redis_python_parser"] = ("the same, redis-py's Python parser", RedisStore,
                                      {"parser_class": _AsyncRESP2Parser}, 1)
    return out


async def redis_replies(client: Any) -> int:
    """Replies Redis has written so far: one per round trip of a client that does not
    pipeline (INFO's own reply included, subtracted by the caller)."""
    return int((await client.info("stats"))["total_writes_processed"])


async def drive_concurrently(target: Any, items: list[tuple[Attempt, bool]], at_once: int
                             ) -> list[Decision]:
    """check+report over items, `at_once` logins in flight (each worker its own slice)."""
    results: list[list[Decision]] = [[] for _ in range(at_once)]

    async def worker(n: int) -> None:
        out = results[n]
        for attempt, success in items[n::at_once]:
            out.append(await target.check(attempt))
            await target.report(attempt, success)

    await asyncio.gather(*(worker(n) for n in range(at_once)))
    return [d for part in results for d in part]


async def bench_redis(mode: Mode, redis_url: str, tmp: Path) -> dict[str, Any]:
    from redis import asyncio as aioredis

    from security.mfa.manager import MfaManager
    from security.mfa.sealing import Sealer
    from security.mfa.settings import MfaSettings

    settings, _ = settings_from(CONFIG, tmp)
    variants = redis_variants()
    engines: dict[str, SecurityManager] = {}
    for n, (name, (_, cls, options, _)) in enumerate(variants.items()):
        store = cls(redis_url, prefix=f"bench{n}:", **options)
        engine = engines[name] = SecurityManager(settings, store)
        # MFA on, as the exporter's default: every check asks for the user's MFA fields
        engine.second_factor = MfaManager(MfaSettings(), store, Sealer("k" * 40))
        await store.open()
    stats = aioredis.from_url(redis_url)
    workload = Workload(seed=2027)
    warm = workload.batch(200)  # the same for all: one-at-a-time candidates decide alike
    for name, engine in engines.items():  # warm-up: scripts loaded, connections open
        await drive_concurrently(engine, warm, variants[name][3])
        # a candidate whose store calls fail would be timed answering store_unavailable
        assert not engine.stats.store_errors, f"{name}: store calls failed in the warm-up"
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    trips: dict[str, list[float]] = {name: [] for name in engines}
    mixes: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in engines}
    names = list(engines)
    for rnd in range(mode.redis_rounds):
        items = workload.batch(mode.redis_pairs)
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            replies = await redis_replies(stats)
            cpu_start, start = time.process_time(), time.perf_counter()
            decisions = await drive_concurrently(engines[name], items, variants[name][3])
            wall, used = time.perf_counter() - start, time.process_time() - cpu_start
            trips[name].append((await redis_replies(stats) - replies - 1) / mode.redis_pairs)
            seconds[name].append(wall / mode.redis_pairs * 1e6)
            cpu[name].append(used / mode.redis_pairs * 1e6)
            mixes[name].update(f"{d.action}/{d.reason}" for d in decisions)
        say(f"redis round {rnd + 1}: " + ", ".join(
            f"{name} {cpu[name][-1]:.0f} us CPU {trips[name][-1]:.2f} trips" for name in names))
    for engine in engines.values():
        await engine.store.close()
    await stats.aclose()
    candidates = {name: {"label": variants[name][0], "at_once": variants[name][3],
                         "wall_us_per_pair": summary(seconds[name]),
                         "cpu_us_per_pair": summary(cpu[name]),
                         "round_trips_per_pair": summary(trips[name]),
                         "decisions": dict(mixes[name].most_common())} for name in names}
    med = {name: c["cpu_us_per_pair"]["median"] for name, c in candidates.items()}
    ratios = {f"{name}/redis_per_call": ratio(med[name], med["redis_per_call"])
              for name in names if name != "redis_per_call" and not name.endswith("_8")}
    ratios["redis_8/redis_per_call_8"] = ratio(med["redis_8"], med["redis_per_call_8"])
    return {"pairs_per_round": mode.redis_pairs, "rounds": mode.redis_rounds,
            "workload": WORKLOAD_NOTE + "; the MFA manager attached (no user enrolled)",
            "candidates": candidates, "ratios_of_cpu_us": ratios}


# --- main ------------------------------------------------------------------------------


def targets_met(inproc: dict[str, Any], http: dict[str, Any],
                memory: dict[str, Any]) -> list[dict[str, Any]]:
    """The security-engine issue's targets against today's medians."""
    mem = inproc["candidates"]["memory"]["us_per_pair"]["median"]
    policy = http["cases"]["dovecot_policy"]
    rps, p99 = policy["requests_per_second"]["median"], policy["p99_ms"]["median"]
    few = http["cases"][f"dovecot_policy_{FEW_CONNECTIONS}_connections"]
    few_rps, few_p99 = few["requests_per_second"]["median"], few["p99_ms"]["median"]
    # A closed loop of N connections waits N / throughput per request on average (Little's
    # law): at 32 connections that floor alone is over 5 ms below 6,400 requests/s, so the
    # p99 target is judged at both counts and each shows its floor.
    floor, few_floor = policy["queueing_mean_ms"], few["queueing_mean_ms"]
    share = http["ratios"]["dovecot_policy/livez"]
    per_key = memory["per_key"]["rss_bytes_per_tracked_key"]
    bounded, sq = memory["bounded"], memory["bounded_sqlite"]
    allowed = BOUNDED_GROWTH_SHARE * per_key  # bytes per further address once full

    def growth(case: dict[str, Any]) -> str:
        return (f"+{case['rss_growth_mb_first_half']:.1f} MB over the first half, then "
                f"+{case['rss_growth_mb_second_half']:.1f} MB = "
                f"{case['rss_bytes_per_address_second_half']:.0f} bytes per further address")

    return [
        {"target": "under 20 µs per check+report pair in process, memory store",
         "measured": f"{mem:.1f} µs", "met": mem < TARGET_PAIR_US},
        {"target": "at least 5,000 decisions/s on POST /dovecot/policy (allow and report "
                   "alternating, SQLite store)",
         "measured": f"{rps:,.0f} requests/s ({rps / 2:,.0f} allow decisions/s)",
         "met": rps >= TARGET_DECISIONS_PER_S},
        {"target": f"p99 under 5 ms on POST /dovecot/policy (wrk, {WRK_CONNECTIONS} connections)",
         "measured": f"{p99:.2f} ms (queueing floor {floor:.2f} ms)",
         "met": p99 < TARGET_P99_MS},
        {"target": f"... the same with {FEW_CONNECTIONS} connections (about the logins a busy "
                   "Dovecot has in flight), still at least 5,000 requests/s",
         "measured": f"{few_p99:.2f} ms at {few_rps:,.0f} requests/s (queueing floor "
                     f"{few_floor:.2f} ms)",
         "met": few_p99 < TARGET_P99_MS and few_rps >= TARGET_DECISIONS_PER_S},
        {"target": "/dovecot/policy serves at least half the requests/s of /livez",
         "measured": f"{share:.2f}x", "met": share >= TARGET_LIVEZ_SHARE},
        {"target": "under 300 bytes per tracked key (MemoryStore)",
         "measured": f"{per_key:.0f} bytes (RSS, {memory['per_key']['tracked_keys']:,} keys)",
         "met": per_key < TARGET_BYTES_PER_KEY},
        {"target": f"max_tracked_keys={bounded['max_keys']:,} holds the store at that many keys "
                   f"after {bounded['inserted']:,} distinct addresses (memory and SQLite store)",
         "measured": f"{bounded['tracked_keys']:,} and {sq['tracked_keys']:,} keys",
         "met": max(bounded["tracked_keys"], sq["tracked_keys"]) <= bounded["max_keys"]},
        {"target": "... and RSS stops growing once the store is full (under "
                   f"{BOUNDED_GROWTH_SHARE:.0%} of a key's bytes per further address), "
                   "memory store",
         "measured": f"{growth(bounded)}; {bounded['dirty_keys']:,} keys left in "
                     "MemoryStore.dirty",
         "met": bounded["rss_bytes_per_address_second_half"] < allowed},
        {"target": "... the same, SQLite store (flush() at each tenth)",
         "measured": growth(sq),
         "met": sq["rss_bytes_per_address_second_half"] < allowed},
    ]


def run_parts(mode: Mode, tmp: Path, redis: Redis, began: float
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The four parts, in the order that keeps them from competing for the cores."""
    # The servers boot while the memory part (in child processes, RSS only) runs.
    servers = {"default": start_server("default", CONFIG, tmp),
               "no_login_audit": start_server("no_login_audit", CONFIG_NO_LOGIN_AUDIT, tmp),
               "memory_store": start_server("memory_store", CONFIG_MEMORY_STORE, tmp),
               "redis": start_server("redis", CONFIG + (
                   f"  store: {{type: redis, redis_url: '{redis.url}'}}\n"), tmp)}
    servers["redis"].redis_pid = redis.pid
    try:
        memory = bench_memory(mode)
        say(f"memory part took {time.monotonic() - began:.1f} s")
        for server in servers.values():
            wait_for_port(server.port, server.proc)
        http = bench_http(mode, servers, tmp)
        say(f"http part done after {time.monotonic() - began:.1f} s")
    except Exception:
        for server in servers.values():
            if server.log.exists():
                say(f"--- {server.name} log tail:\n{server.log.read_text()[-3000:]}")
        raise
    finally:
        for server in servers.values():
            stop(server.proc)
    # In-process last, with the servers gone, so nothing else competes for the cores.
    with event_loop_runner() as runner:
        inproc = runner.run(bench_inprocess(mode, tmp))
        say(f"in-process part done after {time.monotonic() - began:.1f} s")
        redis_part = runner.run(bench_redis(mode, redis.url, tmp))
        say(f"redis part done after {time.monotonic() - began:.1f} s")
    return inproc, http, memory, redis_part


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run under 20 s")
    parser.add_argument("--out", type=Path, help="result file (default results/security.json)")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    mode = QUICK if args.quick else FULL

    with tempfile.TemporaryDirectory(prefix="bench-security-") as tmp_name:
        tmp = Path(tmp_name)
        began = time.monotonic()
        redis = Redis(tmp / "redis").start()
        try:
            inproc, http, memory, redis_part = run_parts(mode, tmp, redis, began)
        finally:
            redis.stop()

    path = write_result("security", args.out, {
        "mode": "quick" if args.quick else "full",
        "issue": "security engine",
        "baselines": {"inprocess": "a dict counter behind the same two awaited calls",
                      "http": "GET /livez on the same server, same wrk settings",
                      "redis": "the same engine calls one by one on Redis (PerCallRedisStore)"},
        "inprocess": inproc, "http": http, "memory": memory, "redis": redis_part,
        "targets": targets_met(inproc, http, memory),
    })
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
