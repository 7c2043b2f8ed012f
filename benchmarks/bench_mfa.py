"""Benchmark "mfa": what one TOTP verification costs, against bare pyotp.TOTP.verify.

Candidates, run in the same rounds with their order rotated:

- pyotp: `otp.verify(code, valid_window=1)` on a ready pyotp.TOTP, the bare library
  call (the baseline);
- match: security.mfa.totp.match, our code check alone (the same window);
- manager_memory: `await MfaManager.verify_totp(user, code)` on the memory store, the
  whole path: rate limit, failure count, unsealing the AES-GCM secret, the check, the
  atomic replay-step advance; no audit log;
- manager_memory_audit: the same with the hash-chained audit log on (one record per
  verification, as the exporter runs it);
- manager_sqlite: the same on the SQLite store (the exporter's default), whose replay
  step is written through to disk before the answer;
- manager_wrong_code: a wrong code on the memory store (the failure path).

Every verification is a fresh, valid code: a fake clock moves one time step (30 s) per
call, so no call is a replay and the rate limit never refuses.

Run: .venv/bin/python benchmarks/bench_mfa.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyotp
from common import ratio, say, summary, write_result

from security.audit import AuditLog, AuditPolicy
from security.mfa import totp
from security.mfa.manager import MfaManager
from security.mfa.sealing import Sealer
from security.mfa.settings import MfaSettings
from security.store import open_store

TARGET_US = 50.0
TARGET_RATIO = 2.0
T0 = 4_000_000_010.0
PERIOD = 30


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


async def run(quick: bool) -> dict[str, Any]:
    rounds, number = (3, 2_000) if quick else (15, 20_000)
    workdir = Path(tempfile.mkdtemp(prefix="bench-mfa-"))
    managers: dict[str, tuple[MfaManager, Clock, list[Any]]] = {
        "manager_memory": await _manager("memory", workdir, False),
        "manager_memory_audit": await _manager("memory", workdir, True),
        "manager_sqlite": await _manager("sqlite", workdir, False),
        "manager_wrong_code": await _manager("memory", workdir, False),
    }
    keys = {}
    for name, (manager, _clock, _) in managers.items():
        secret = (await manager.enroll_totp("bench@example.org"))["secret"]
        keys[name] = pyotp.TOTP(secret).byte_secret()
    secret = pyotp.random_base32(32)
    otp, key = pyotp.TOTP(secret), pyotp.TOTP(secret).byte_secret()
    params = totp.TotpParams()

    async def bare_pyotp(n: int) -> float:
        code = otp.now()
        start = time.perf_counter()
        for _ in range(n):
            otp.verify(code, valid_window=1)
        return time.perf_counter() - start

    async def bare_match(n: int) -> float:
        counter = totp.step(time.time(), params)
        code = totp.code_at(key, counter, params)
        start = time.perf_counter()
        for _ in range(n):
            totp.match(key, code, counter, params, 1)
        return time.perf_counter() - start

    def through(name: str, wrong: bool = False) -> Callable[[int], Awaitable[float]]:
        manager, clock, _ = managers[name]

        async def verify(n: int) -> float:
            clock.now += PERIOD
            codes = ["000000" if wrong else c for c in _codes(keys[name], clock.now, n)]
            first = clock.now
            start = time.perf_counter()
            for i, code in enumerate(codes):
                clock.now = first + i * PERIOD
                await manager.verify_totp("bench@example.org", code)
            elapsed = time.perf_counter() - start
            if wrong:  # keep the failure count below max_failures for the next batch
                await manager.store.clear_failures("m:bench@example.org")
            return elapsed
        return verify

    candidates: dict[str, Callable[[int], Awaitable[float]]] = {
        "pyotp": bare_pyotp, "match": bare_match,
        "manager_memory": through("manager_memory"),
        "manager_memory_audit": through("manager_memory_audit"),
        "manager_sqlite": through("manager_sqlite"),
        "manager_wrong_code": through("manager_wrong_code", wrong=True),
    }
    for fn in candidates.values():  # warm-up
        await fn(200)
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
    base = results["pyotp"]["median"]
    ratios = {f"{name}/pyotp": ratio(results[name]["median"], base)
              for name in names if name != "pyotp"}
    main_case = results["manager_memory"]["median"]
    audit_case = results["manager_memory_audit"]["median"]
    targets = [
        {"target": "TOTP verify (memory store, no audit) under 50 µs",
         "measured": f"{main_case:.1f} µs", "met": main_case < TARGET_US},
        {"target": "TOTP verify (memory store, no audit) within 2x of pyotp.TOTP.verify",
         "measured": f"{ratios['manager_memory/pyotp']:.2f}x",
         "met": ratios["manager_memory/pyotp"] <= TARGET_RATIO},
        {"target": "TOTP verify with the audit log under 50 µs",
         "measured": f"{audit_case:.1f} µs", "met": audit_case < TARGET_US},
    ]
    return {"mode": "quick" if quick else "full", "issue": "7", "rounds": rounds,
            "verifications_per_round": number, "us_per_verify": results, "ratios": ratios,
            "outcomes": {k: {f"{m}/{r}": n for (m, r), n in v.items()}
                         for k, v in checks.items()},
            "targets": targets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--out", type=Path, help="result file (default results/mfa.json)")
    args = parser.parse_args()
    data = asyncio.run(run(args.quick))
    for name, stats in data["us_per_verify"].items():
        say(f"{name:22s} {stats['median']:8.2f} µs  ({stats['min']:.2f}-{stats['max']:.2f})")
    for key, value in data["ratios"].items():
        say(f"{key:34s} {value:.2f}")
    for target in data["targets"]:
        say(f"target: {target['target']}: {target['measured']} "
            f"({'met' if target['met'] else 'NOT met'})")
    say(f"wrote {write_result('mfa', args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
