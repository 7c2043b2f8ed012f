"""Benchmark "scaling": Dovecot policy decisions/s with 1, 2 and 4 exporter processes
sharing one Redis, against one process on its embedded SQLite store, in the same run.

Each exporter process gets its own wrk (1 thread, 8 connections) running the same Lua
workload (command=allow and command=report alternating, distinct accounts and addresses
per process); the processes' requests/s are added up. Exporter and Redis CPU time
(psutil) and wrk's (this process's reaped children) are read per case, with the 1-minute
load average at its start, so the figures say where the time goes when the total stops
growing: wrk, Redis and the exporters share the machine's cores, so scaling stops when
they are all busy, not at a limit of the design. Redis's own count of replies written
(INFO total_writes_processed) gives its round trips per request.

Run: .venv/bin/python benchmarks/bench_scaling.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import ROOT, free_port, ratio, say, stop, summary, wait_for_port, write_result

sys.path.insert(0, str(ROOT))
from tests.integration.components import Redis  # noqa: E402 - a plain class, no pytest

LUA = """
local n, seed = 0, 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function init(args) seed = tonumber(args[1]) end
function request()
  n = n + 1
  local i = math.floor((n + 1) / 2)
  local body = string.format(
    '{"login":"p%d-user%d@example.test","remote":"198.%d.%d.%d","pwhash":"%08x",'
    .. '"protocol":"imap"', seed, i % 5000, 18 + seed % 2, (i / 250) % 250, i % 250,
    (i * 2654435761 + seed) % 4294967296)
  if n % 2 == 1 then
    return wrk.format(nil, "/dovecot/policy?command=allow", nil, body .. "}")
  end
  return wrk.format(nil, "/dovecot/policy?command=report", nil,
                    body .. ',"success":' .. ((i % 4 == 0) and "false" or "true") .. "}")
end
"""
CONFIG = """\
security:
  trusted_networks: []
  enable_rate_limiting: false
  store: {store}
"""


def start_exporter(tmp: Path, name: str, store: str) -> tuple[subprocess.Popen[bytes], int]:
    workdir = tmp / name
    workdir.mkdir()
    config = workdir / "config.yaml"
    config.write_text(CONFIG.format(store=store))
    port = free_port()
    log = (workdir / "exporter.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "run", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(workdir / "state"), "--config", str(config)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, proc)
    return proc, port


def wrk(port: int, seconds: int, script: Path, seed: int, out: dict[int, str]) -> None:
    done = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", "--latency", "-s",
                           str(script), f"http://127.0.0.1:{port}", "--", str(seed)],
                          capture_output=True, text=True, check=True)
    out[seed] = done.stdout


def parse(text: str) -> dict[str, float]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    requests = re.search(r"(\d+) requests in", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)$", text, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)$", text, re.MULTILINE)
    if not (rps and requests and p99 and p50):
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    unit = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return {"rps": float(rps.group(1)), "requests": int(requests.group(1)),
            "p50_ms": float(p50.group(1)) * unit[p50.group(2)],
            "p99_ms": float(p99.group(1)) * unit[p99.group(2)],
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}


def cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def children_cpu() -> float:
    """CPU seconds of this process's reaped children: the wrk runs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_replies(redis: Redis | None) -> int:
    """Replies the Redis has written: one per round trip of a client that does not
    pipeline (the INFO that asks included)."""
    if redis is None:
        return 0
    done = subprocess.run(["redis-cli", "-h", redis.host, "-p", str(redis.port), "info",
                           "stats"], capture_output=True, text=True, check=True)
    return int(re.search(r"total_writes_processed:(\d+)", done.stdout).group(1))  # type: ignore[union-attr]


def run_case(ports: list[int], pids: list[int], redis: Redis | None, seconds: int,
             script: Path) -> dict[str, Any]:
    outputs: dict[int, str] = {}
    redis_pid = redis.pid if redis is not None else None
    load = os.getloadavg()[0]
    replies = redis_replies(redis)
    before, redis_before = cpu(pids), cpu([redis_pid]) if redis_pid else 0.0
    wrk_before = children_cpu()
    started = time.monotonic()
    threads = [threading.Thread(target=wrk, args=(port, seconds, script, seed, outputs))
               for seed, port in enumerate(ports)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    runs = [parse(outputs[seed]) for seed in range(len(ports))]
    total = sum(r["rps"] for r in runs)
    server_cpu = (cpu(pids) - before) / wall
    redis_cpu = ((cpu([redis_pid]) - redis_before) / wall) if redis_pid else 0.0
    wrk_cpu = (children_cpu() - wrk_before) / wall  # before redis-cli runs again
    trips = (redis_replies(redis) - replies - 1) if redis is not None else 0
    return {"decisions_per_second": total, "p50_ms": max(r["p50_ms"] for r in runs),
            "p99_ms": max(r["p99_ms"] for r in runs),
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "exporter_cpu_cores": server_cpu, "redis_cpu_cores": redis_cpu,
            "wrk_cpu_cores": wrk_cpu, "busy_cores": server_cpu + redis_cpu + wrk_cpu,
            "exporter_cpu_us_per_decision": server_cpu / total * 1e6 if total else 0.0,
            "redis_round_trips_per_decision": trips / max(1, sum(r["requests"] for r in runs)),
            "loadavg_1m_at_start": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, fewer rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seconds, rounds = (4, 1) if args.quick else (10, 3)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "policy.lua"
        script.write_text(LUA)
        redis = Redis(tmp / "redis").start()
        procs: dict[str, list[tuple[subprocess.Popen[bytes], int]]] = {}
        try:
            procs["sqlite_1"] = [start_exporter(tmp, "sqlite", "{type: sqlite}")]
            redis_store = f"{{type: redis, redis_url: '{redis.url}'}}"
            replicas = [start_exporter(tmp, f"redis{n}", redis_store) for n in range(4)]
            for n in (1, 2, 4):
                procs[f"redis_{n}"] = replicas[:n]
            for case in procs.values():  # warm-up: first requests, caches, connections
                run_case([p for _, p in case], [pr.pid for pr, _ in case], None, 2, script)
            samples: dict[str, list[dict[str, Any]]] = {name: [] for name in procs}
            for rnd in range(rounds):
                for name, case in procs.items():
                    result = run_case([p for _, p in case], [pr.pid for pr, _ in case],
                                      redis if name.startswith("redis") else None,
                                      seconds, script)
                    samples[name].append(result)
                    say(f"round {rnd + 1} {name}: {result['decisions_per_second']:,.0f} "
                        f"requests/s, p99 {result['p99_ms']:.2f} ms, exporters "
                        f"{result['exporter_cpu_cores']:.2f} cores "
                        f"({result['exporter_cpu_us_per_decision']:.0f} us a request), redis "
                        f"{result['redis_cpu_cores']:.2f} "
                        f"({result['redis_round_trips_per_decision']:.2f} round trips a "
                        f"request), wrk {result['wrk_cpu_cores']:.2f}, load "
                        f"{result['loadavg_1m_at_start']:.1f}")
        finally:
            for case in {id(p): p for c in procs.values() for p, _ in c}.values():
                stop(case)
            redis.stop()
    cases = {name: {key: summary([s[key] for s in runs]) for key in runs[0]}
             for name, runs in samples.items()}
    base = cases["redis_1"]["decisions_per_second"]["median"]
    ratios = {f"{name}/redis_1": ratio(c["decisions_per_second"]["median"], base)
              for name, c in cases.items()}
    out = write_result("scaling", args.out, {
        "mode": "quick" if args.quick else "full", "rounds": rounds, "seconds": seconds,
        "cases": cases, "ratios": ratios,
        "method": "one wrk (1 thread, 8 connections) per exporter process, all at once; "
                  "requests/s added up; p50/p99 the worst process's",
    })
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
