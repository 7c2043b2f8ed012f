"""Benchmark "mfa": what one TOTP verification costs, against bare pyotp.TOTP.verify.

Candidates, run in the same rounds with their order rotated:

- pyotp: `otp.verify(code, for_time=t, valid_window=1)` on a ready pyotp.TOTP, the bare
  library call (the baseline), with the code of t's own step (pyotp tries the step
  before first, so it computes two codes; a code of the step before would take one, a
  stale one three: a fixed t keeps the baseline from drifting with the wall clock);
- match: security.mfa.totp.match on a keyed secret (as the manager caches it), our code
  check alone (the same window; it tries the user's drift first, here 0: one code);
- manager_memory: `await MfaManager.verify_totp(user, code)` on the memory store, the
  whole path: rate limit, failure count, unsealing the AES-GCM secret, the check, the
  atomic replay-step advance; no audit log;
- manager_memory_audit: the same with the hash-chained audit log on (one record per
  verification, as the exporter runs it);
- manager_sqlite: the same on the SQLite store (the exporter's default), whose accepted
  step is journaled (one write() of one line) before the answer, committed behind;
- manager_sqlite_audit: the SQLite store with the audit log: the exporter's default setup;
- manager_wrong_code: a wrong code on the memory store (the failure path).

Parts, in the same rounds, to show where a verification's time goes:

- audit_record: one `AuditLog.append` with a verification's details, alone (what the
  manager writes per verification);
- sqlite_journal_line: what the SQLite store adds to an accepted step now (the journal
  line for the advanced field);
- sqlite_worker_hop: `await` of a no-op on the store's worker thread (what every
  write-through to SQLite pays before any SQL runs);
- sqlite_commit_on_worker: the MFA write transaction the step used to wait for before the
  answer (hop + BEGIN, INSERT OR REPLACE, COMMIT in WAL with synchronous=NORMAL);
- sqlite_commit_on_loop: the same transaction without the hop, on the caller's thread.

Every verification is a fresh, valid code: a fake clock moves one time step (30 s) per
call, so no call is a replay and the rate limit never refuses. Ratios are medians of the
per-round ratios (each candidate against pyotp in the same round).

Run: .venv/bin/python benchmarks/bench_mfa.py [--quick] [--clock cpu] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyotp
from common import add_timer_argument, ratio, say, summary, timer, write_result

from security.audit import AuditLog, AuditPolicy
from security.mfa import totp
from security.mfa.manager import MfaManager
from security.mfa.sealing import Sealer
from security.mfa.settings import MfaSettings
from security.store import open_store
from security.store.sqlite import SqliteStore

TARGET_US = 50.0
TARGET_RATIO = 2.0
T0 = 4_000_000_010.0
PERIOD = 30
USER = "bench@example.org"
DETAILS = {"method": "totp", "reason": "ok", "drift_steps": 0, "confirmed": True}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def _manager(kind: str, workdir: Path, audit: bool) -> tuple[MfaManager, Clock,
                                                                   list[Any]]:
    clock = Clock()
    store = open_store(kind, path=str(workdir / f"{kind}-{audit}.db"))
    await store.open()
    log = AuditLog(workdir / f"audit-{kind}-{audit}", AuditPolicy()) if audit else None
    manager = MfaManager(MfaSettings(), store, Sealer("bench-key-" * 4), log, clock=clock)
    return manager, clock, [store, log]


def _codes(key: bytes, start: float, n: int) -> list[str]:
    params = totp.TotpParams()
    return [totp.code_at(key, totp.step(start + i * PERIOD, params), params) for i in range(n)]


async def run(quick: bool, clock: Callable[[], float]) -> dict[str, Any]:
    rounds, number = (20, 300) if quick else (40, 3_000)
    workdir = Path(tempfile.mkdtemp(prefix="bench-mfa-"))
    managers: dict[str, tuple[MfaManager, Clock, list[Any]]] = {
        "manager_memory": await _manager("memory", workdir, False),
        "manager_memory_audit": await _manager("memory", workdir, True),
        "manager_sqlite": await _manager("sqlite", workdir, False),
        "manager_sqlite_audit": await _manager("sqlite", workdir, True),
        "manager_wrong_code": await _manager("memory", workdir, False),
    }
    keys = {}
    for name, (manager, _clock, _) in managers.items():
        secret = (await manager.enroll_totp(USER))["secret"]
        keys[name] = pyotp.TOTP(secret).byte_secret()
    secret = pyotp.random_base32(32)
    otp, key = pyotp.TOTP(secret), pyotp.TOTP(secret).byte_secret()
    params = totp.TotpParams()
    log = AuditLog(workdir / "audit-alone", AuditPolicy())
    parts_store = SqliteStore(workdir / "parts.db", flush_interval=3600)
    await parts_store.open()
    step = [0]

    def timed(fn: Callable[[], Any]) -> Callable[[int], Awaitable[float]]:
        async def loop(n: int) -> float:
            start = clock()
            for _ in range(n):
                fn()
            return clock() - start
        return loop

    def timed_async(fn: Callable[[], Awaitable[Any]]) -> Callable[[int], Awaitable[float]]:
        async def loop(n: int) -> float:
            start = clock()
            for _ in range(n):
                await fn()
            return clock() - start
        return loop

    code = otp.at(T0)
    assert otp.verify(code, for_time=T0, valid_window=1)
    counter = totp.step(T0, params)
    match_code, keyed = totp.code_at(key, counter, params), totp.keyed(key, params)
    assert totp.match(keyed, match_code, counter, params, 1) == 0

    def journal_line() -> None:
        step[0] += 1
        fields = parts_store._mfa.setdefault(USER, {})
        fields["totp_step"] = str(step[0])
        parts_store._journal(USER, ["totp_step"])

    def commit() -> None:
        step[0] += 1
        parts_store._write_mfa_rows([(USER, "totp_step", str(step[0]))], [])

    async def commit_on_worker() -> None:
        await parts_store._run(commit)

    def through(name: str, wrong: bool = False) -> Callable[[int], Awaitable[float]]:
        manager, fake, _ = managers[name]

        async def verify(n: int) -> float:
            fake.now += PERIOD
            codes = ["000000" if wrong else c for c in _codes(keys[name], fake.now, n)]
            first = fake.now
            start = clock()
            for i, c in enumerate(codes):
                fake.now = first + i * PERIOD
                await manager.verify_totp(USER, c)
            elapsed = clock() - start
            if wrong:  # keep the failure count below max_failures for the next batch
                await manager.store.clear_failures(f"m:{USER}")
            return elapsed
        return verify

    candidates: dict[str, Callable[[int], Awaitable[float]]] = {
        "pyotp": timed(lambda: otp.verify(code, for_time=T0, valid_window=1)),
        "match": timed(lambda: totp.match(keyed, match_code, counter, params, 1)),
        "manager_memory": through("manager_memory"),
        "manager_memory_audit": through("manager_memory_audit"),
        "manager_sqlite": through("manager_sqlite"),
        "manager_sqlite_audit": through("manager_sqlite_audit"),
        "manager_wrong_code": through("manager_wrong_code", wrong=True),
        "audit_record": timed(lambda: log.append("mfa.verify.success", "api", USER, DETAILS)),
        "sqlite_journal_line": timed(journal_line),
        "sqlite_worker_hop": timed_async(lambda: parts_store._run(int)),
        "sqlite_commit_on_worker": timed_async(commit_on_worker),
        "sqlite_commit_on_loop": timed(commit),
    }
    for fn in candidates.values():  # warm-up
        await fn(100)
    names = list(candidates)
    us: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            us[name].append(await candidates[name](number) / number * 1e6)
    results = {name: summary(values) for name, values in us.items()}
    checks = {name: dict(manager.stats.verifications) for name, (manager, _, _) in
              managers.items()}
    for _, _, closing in managers.values():
        await closing[0].close()
        if closing[1] is not None:
            closing[1].close()
    log.close()
    await parts_store.close()
    ratios = {f"{name}/pyotp": statistics.median(ratio(c, b) for c, b in zip(
        us[name], us["pyotp"], strict=True)) for name in names if name != "pyotp"}
    targets = []
    for name, label in (("manager_memory", "memory store, no audit"),
                        ("manager_memory_audit", "memory store, with the audit log"),
                        ("manager_sqlite", "SQLite store, no audit"),
                        ("manager_sqlite_audit", "SQLite store with the audit log, the "
                                                 "exporter's default")):
        median = results[name]["median"]
        targets += [
            {"target": f"TOTP verify ({label}) under {TARGET_US:.0f} µs",
             "measured": f"{median:.1f} µs", "met": median < TARGET_US},
            {"target": f"TOTP verify ({label}) within {TARGET_RATIO:.0f}x of "
                       "pyotp.TOTP.verify",
             "measured": f"{ratios[name + '/pyotp']:.2f}x",
             "met": ratios[name + "/pyotp"] <= TARGET_RATIO}]
    return {"mode": "quick" if quick else "full", "issue": "7", "rounds": rounds,
            "verifications_per_round": number, "us_per_verify": results, "ratios": ratios,
            "outcomes": {k: {f"{m}/{r}": n for (m, r), n in v.items()}
                         for k, v in checks.items()},
            "targets": targets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--out", type=Path, help="result file (default results/mfa.json)")
    add_timer_argument(parser)
    args = parser.parse_args()
    data = asyncio.run(run(args.quick, timer(args.clock)))
    data["clock"] = args.clock
    for name, stats in data["us_per_verify"].items():
        say(f"{name:24s} {stats['median']:8.2f} µs  ({stats['min']:.2f}-{stats['max']:.2f})")
    for key, value in data["ratios"].items():
        say(f"{key:34s} {value:.2f}")
    for target in data["targets"]:
        say(f"target: {target['target']}: {target['measured']} "
            f"({'met' if target['met'] else 'NOT met'})")
    say(f"wrote {write_result('mfa', args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
