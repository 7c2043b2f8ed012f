"""Benchmark "identity": API key check, session validate and CSRF verify, in process, against
the bare library calls they are built on.

Candidates (each on a memory store, no audit log: the check as the HTTP layer calls it):
- apikey ok / wrong / unknown / revoked: `await ApiKeys.authenticate(token)` (the
  failure cases show that wrong, unknown and revoked keys cost the same);
- apikey ok, SQLite store: the same on the embedded default store (reads from memory);
- session validate: `await Sessions.validate(session_id)` (with the idle-timer touch);
- csrf verify: `CsrfTokens.verify(session_id, token)`.
Baselines in the same rounds: `hmac.compare_digest(hashlib.sha256(key).hexdigest(),
stored)` (the issue's bare call), the same inside a coroutine that is awaited (the floor
of any async check), and `hmac.compare_digest(hmac.digest(key, msg, "sha256"), mac)` (the
bare HMAC a CSRF token needs).

Each round times `calls` calls of every case, cases rotated each round; figures are
medians (min-max) over the rounds, in µs per call.

Run: .venv/bin/python benchmarks/bench_identity.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import hmac
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import ratio, say, summary, write_result

from security.apikeys import ApiKeys
from security.csrf import CsrfTokens
from security.sessions import Sessions
from security.store import Store, open_store

TARGET_US = 50.0
TARGET_RATIO = 2.0


async def _timed_async(fn: Callable[[], Awaitable[Any]], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await fn()
    return (time.perf_counter() - start) / calls * 1e6


def _timed_sync(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


async def _opened(kind: str, directory: Path) -> Store:
    store = open_store(kind, path=str(directory / f"{kind}.db"), flush_interval=3600)
    await store.open()
    return store


async def measure(rounds: int, calls: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="bench-identity-"))
    memory, sqlite = await _opened("memory", directory), await _opened("sqlite", directory)
    keys, sqlite_keys = ApiKeys(memory), ApiKeys(sqlite)
    for k in (keys, sqlite_keys):  # no per-key limit in the way of a long loop
        k.settings = type(k.settings)(rate_limit_per_minute=10**9, rate_limit_burst=10**9)
    key, token = await keys.create("bench", ["admin"], rate_limit_per_minute=10**9)
    _, sqlite_token = await sqlite_keys.create("bench", ["admin"], rate_limit_per_minute=10**9)
    revoked, revoked_token = await keys.create("revoked", ["admin"])
    await keys.revoke(revoked.id)
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    unknown = "a3m_000000000000_" + token.split("_", 2)[2]
    sessions = Sessions(memory)
    _, sid = await sessions.create("bench@example.org")
    csrf = CsrfTokens(b"k" * 32)
    csrf_token = csrf.issue(sid)
    stored = hashlib.sha256(token.encode()).hexdigest()
    mac = hmac.digest(b"k" * 32, sid.encode(), "sha256")

    def bare() -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), stored)

    async def bare_awaited() -> bool:
        return bare()

    def bare_hmac() -> bool:
        return hmac.compare_digest(hmac.digest(b"k" * 32, sid.encode(), "sha256"), mac)

    sync_cases: dict[str, Callable[[], Any]] = {
        "bare: sha256 + compare_digest": bare,
        "bare: HMAC-SHA256 + compare_digest": bare_hmac,
        "csrf verify": lambda: csrf.verify(sid, csrf_token),
    }
    async_cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "bare, awaited in a coroutine": bare_awaited,
        "apikey ok": lambda: keys.authenticate(token),
        "apikey wrong secret": lambda: keys.authenticate(wrong),
        "apikey unknown id": lambda: keys.authenticate(unknown),
        "apikey revoked": lambda: keys.authenticate(revoked_token),
        "apikey ok, SQLite store": lambda: sqlite_keys.authenticate(sqlite_token),
        "session validate": lambda: sessions.validate(sid),
    }
    assert (await keys.authenticate(token)).ok and not (await keys.authenticate(wrong)).ok
    assert await sessions.validate(sid) is not None and csrf.verify(sid, csrf_token) == "ok"
    names = [*sync_cases, *async_cases]
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            if name in sync_cases:
                samples[name].append(_timed_sync(sync_cases[name], calls))
            else:
                samples[name].append(await _timed_async(async_cases[name], calls))
    keys_flushed = len(keys._used)
    await memory.close()
    await sqlite.close()
    cases = {name: summary(values) for name, values in samples.items()}
    base = cases["bare: sha256 + compare_digest"]["median"]
    return {"rounds": rounds, "calls_per_round": calls, "cases": cases,
            "ratios_to_bare": {name: ratio(c["median"], base) for name, c in cases.items()},
            "pending_last_used": keys_flushed,
            "note": "memory store unless named; no audit log; the apikey cases include the "
                    "per-key GCRA limiter and the last-used bookkeeping"}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    cases, ratios = result["cases"], result["ratios_to_bare"]
    out = []
    for name in ("apikey ok", "session validate", "csrf verify"):
        us, r = cases[name]["median"], ratios[name]
        out.append({"target": f"{name}: under {TARGET_US:.0f} µs in process",
                    "measured": f"{us:.2f} µs", "met": us < TARGET_US})
        out.append({"target": f"{name}: within {TARGET_RATIO:.0f}x of sha256 + "
                              "compare_digest",
                    "measured": f"{r:.2f}x", "met": r <= TARGET_RATIO})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, to smoke-test")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rounds, calls = (3, 2_000) if args.quick else (15, 20_000)
    say(f"identity: {rounds} rounds of {calls:,} calls per case")
    result = asyncio.run(measure(rounds, calls))
    for name, c in result["cases"].items():
        say(f"  {name}: {c['median']:.2f} µs ({result['ratios_to_bare'][name]:.2f}x bare)")
    path = write_result("identity", args.out, {
        "mode": "quick" if args.quick else "full", "issue": "7 (identity)", **result,
        "targets": targets(result)})
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
