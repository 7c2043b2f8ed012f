"""Benchmark "instructions": CPU instructions per operation under valgrind's callgrind.

This 2-core VM's speed swings 2-3x between rounds (BENCHMARKS.md notes), so a timed
difference of a few per cent drowns; an instruction count does not move with the host.
Each case runs in a child process under `valgrind --tool=callgrind` twice, with 0 and
with N operations after the same set-up, inputs (made for N in both runs) and warm-up;
(I(N) - I(0)) / N is what one operation costs, the exporter's threads included; every
child runs with PYTHONHASHSEED=0, so a rerun counts the same dict collisions.
Caveats: callgrind counts user-space instructions only (no kernel: a write() counts as
its libc wrapper), and OpenSSL's SHA-1/SHA-256 run without SHA-NI under valgrind, about
10x their native count, so the hashing cases (TOTP, the audit chain) look costlier than
they are.

Cases:
- pyotp_verify: pyotp.TOTP.verify(code, for_time, valid_window=1) on a ready object
  (bench_mfa's baseline);
- totp_verify: MfaManager.verify_totp on the SQLite store with the audit log (the
  exporter's default), a fresh valid code each time;
- check_report: SecurityManager check + report on the memory store, bench_security's
  workload (bench_inprocess's memory candidate);
- policy_off, policy_rate_0, policy_rate_0.1, policy_rate_1: one POST /dovecot/policy
  (allow and report alternating, bench_security's mix) through the exporter's uvicorn
  protocol on an in-memory transport (no sockets: the same bytes a client sends), the
  embedded default config with the SQLite store and audit log; tracing off, on but
  never sampled, at 0.1 and at 1.0, exporting to an OTLP/HTTP receiver in another
  process (bench_tracing's sink: its work is not counted, the exporter's POSTs are);
- livez: GET /livez the same way.

Run: .venv/bin/python benchmarks/bench_instructions.py [--quick] [--out FILE]
(needs valgrind; `make bench-instructions`). Two cases run at a time, one per core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench_tracing import start_sink
from common import say, stop, write_result

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
HTTP_CASES = {"policy_off": None, "policy_rate_0": 0.0, "policy_rate_0.1": 0.1,
              "policy_rate_1": 1.0, "livez": None}
CASES = ("pyotp_verify", "totp_verify", "check_report", *HTTP_CASES)
WARM = 200
T0 = 4_000_000_010.0
USER = "bench@example.org"


# --- the children: set up, warm up, then N operations ---------------------------------


async def child_totp(n: int, total: int, state: Path) -> None:
    from security.audit import AuditLog, AuditPolicy
    from security.mfa import totp
    from security.mfa.manager import MfaManager
    from security.mfa.sealing import Sealer
    from security.mfa.settings import MfaSettings
    from security.store import open_store

    now = [T0]
    store = open_store("sqlite", path=str(state / "security.db"))
    await store.open()
    manager = MfaManager(MfaSettings(), store, Sealer("bench-key-" * 4),
                         AuditLog(state, AuditPolicy()), clock=lambda: now[0])
    secret = (await manager.enroll_totp(USER))["secret"]
    import pyotp
    key, params = pyotp.TOTP(secret).byte_secret(), totp.TotpParams()
    first = now[0] = now[0] + 30
    codes = [totp.code_at(key, totp.step(first + i * 30, params), params)
             for i in range(WARM + total)]
    for i, code in enumerate(codes[:WARM + n]):
        now[0] = first + i * 30
        assert (await manager.verify_totp(USER, code)).valid


def child_pyotp(n: int) -> None:
    import pyotp

    otp = pyotp.TOTP(pyotp.random_base32(32))
    code = otp.at(T0)
    for _ in range(WARM + n):
        otp.verify(code, for_time=T0, valid_window=1)


async def child_check_report(n: int, total: int, state: Path) -> None:
    from bench_security import CONFIG, Workload, drive, settings_from

    from security.engine import SecurityManager
    from security.store import open_store

    settings, security = settings_from(CONFIG, state)
    engine = SecurityManager(settings, open_store(
        "memory", max_keys=security["store"]["max_tracked_keys"]))
    await engine.store.open()
    workload = Workload(seed=2026)
    warm, items = workload.batch(2_000), workload.batch(total)
    await drive(engine, warm)
    await drive(engine, items[:n])


class FakeTransport:
    """What uvicorn's protocol writes to: collects the bytes, wakes the driver."""

    def __init__(self) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.closing = False
        self.not_ok = 0

    def write(self, data: bytes) -> None:
        if data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 200 "):
            self.not_ok += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 9100)
                }.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None: ...


def policy_requests(count: int) -> list[bytes]:
    """allow and report alternating, for bench_security's workload."""
    from bench_security import Workload

    out: list[bytes] = []
    for attempt, success in Workload(seed=2026).batch((count + 1) // 2):
        fields = (f'"login":"{attempt.login}","remote":"{attempt.remote_ip}",'
                  f'"pwhash":"{attempt.pwhash}","protocol":"imap",'
                  f'"session_id":"{attempt.session_id}","tls":true')
        for command, extra in (("allow", ""), ("report",
                                                f',"success":{str(success).lower()}')):
            body = ("{" + fields + extra + "}").encode()
            out.append(f"POST /dovecot/policy?command={command} HTTP/1.1\r\nHost: "
                       f"127.0.0.1:9100\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return out[:count]


async def child_http(case: str, n: int, total: int, state: Path, sink: str) -> None:
    import uvicorn
    from bench_tracing import server_config
    from uvicorn.server import ServerState

    from exporter.config import load_config
    from exporter.http import create_app
    from exporter.http.coalesce import CoalescingHttpToolsProtocol
    from exporter.service import Exporter

    (state / "config.yaml").write_text(server_config(HTTP_CASES[case], sink),
                                       encoding="utf-8")
    config = load_config(str(state / "config.yaml"), {"server": {
        "state_dir": str(state), "listen_address": "127.0.0.1:9100"}})
    exporter = Exporter(config)
    await exporter.start()
    for task in exporter._tasks:  # timers run by wall time (slow under valgrind), not per request
        task.cancel()
    uv_config = uvicorn.Config(create_app(exporter), lifespan="off", log_config=None,
                               http=CoalescingHttpToolsProtocol, access_log=False,
                               server_header=False, proxy_headers=False)
    uv_config.load()
    loop = asyncio.get_running_loop()
    protocol = CoalescingHttpToolsProtocol(uv_config, ServerState(), {}, loop)
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    livez = b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:9100\r\n\r\n"
    requests = [livez] * (WARM + total) if case == "livez" else policy_requests(WARM + total)
    for raw in requests[:WARM + n]:
        transport.waiter = loop.create_future()
        protocol.data_received(raw)
        await transport.waiter
        await asyncio.sleep(0)  # the request cycle ends (its task, the keep-alive timer)
    protocol.connection_lost(None)
    await exporter.stop()
    assert transport.not_ok == 0, f"{transport.not_ok} answers were not 200 OK"


def child(case: str, n: int, total: int, state: Path, sink: str) -> None:
    if case == "pyotp_verify":
        child_pyotp(n)
    elif case == "totp_verify":
        asyncio.run(child_totp(n, total, state))
    elif case == "check_report":
        asyncio.run(child_check_report(n, total, state))
    else:
        import uvloop  # the exporter's loop
        uvloop.run(child_http(case, n, total, state, sink))


# --- the parent ------------------------------------------------------------------------


def instructions(case: str, n: int, total: int, tmp: Path, sink: str) -> int:
    """Instructions counted by callgrind for one child run: n of total operations."""
    state = tmp / f"{case}-{n}"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         str(Path(__file__)), "--child", case, str(n), str(total), str(state),
         sink],
        cwd=ROOT, capture_output=True, text=True, check=False,
        # one hash seed: str and bytes hashes decide dict collisions, which moved a policy
        # request's count by 1.3k (0.4 %) between two seeds
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{BENCH_DIR}", "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or found is None:
        raise RuntimeError(f"{case} with {n}: exit {run.returncode}\n{run.stderr[-3000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=5, metavar=("CASE", "N", "TOTAL", "STATE", "SINK"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, n, total, state, sink = args.child
        child(case, int(n), int(total), Path(state), sink)
        return 0
    if shutil.which("valgrind") is None:
        print("bench_instructions: valgrind is missing (make system-deps installs it)",
              file=sys.stderr)
        return 2
    counts = {"pyotp_verify": 5_000, "totp_verify": 3_000, "check_report": 5_000,
              **dict.fromkeys(HTTP_CASES, 3_000)}
    if args.quick:
        counts = {case: n // 10 for case, n in counts.items()}
    sink_proc, sink = start_sink()  # bench_tracing's OTLP sink, in its own process
    tmp = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # one valgrind per core
            futures = {(case, n): pool.submit(instructions, case, n, counts[case], tmp, sink)
                       for case in CASES for n in (0, counts[case])}
            totals = {key: future.result() for key, future in futures.items()}
    finally:
        stop(sink_proc)
        shutil.rmtree(tmp, ignore_errors=True)
    per_op = {case: (totals[case, counts[case]] - totals[case, 0]) / counts[case]
              for case in CASES}
    for case in CASES:
        say(f"{case}: {per_op[case]:,.0f} instructions per operation "
            f"({counts[case]:,} operations)")
    off = per_op["policy_off"]
    ratios = {"totp_verify/pyotp_verify": per_op["totp_verify"] / per_op["pyotp_verify"],
              **{f"{case}/policy_off": per_op[case] / off for case in HTTP_CASES},
              "policy_off/livez": off / per_op["livez"]}
    for name, value in ratios.items():
        say(f"{name}: {value:.3f}")
    path = write_result("instructions", args.out, {
        "mode": "quick" if args.quick else "full", "operations": counts,
        "instructions_per_operation": per_op, "ratios": ratios})
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
