"""What every benchmark shares: machine facts, round statistics, result files, child processes.

Each benchmark interleaves candidate and baseline within every round so that
machine noise hits both alike, and reports medians and min-max over rounds,
never single runs and never assertions on timings.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# Other work on the machine skews figures; the load averages let a reader see it.
LOAD_AT_START = os.getloadavg()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The facts a reader needs to judge whether figures from two runs are comparable."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": [round(x, 2) for x in LOAD_AT_START],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(shlex.quote(a) for a in [_relative(sys.executable), *_argv()]),
    }


def _relative(path: str) -> str:
    try:
        return str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return path


def _argv() -> list[str]:
    return [_relative(sys.argv[0]), *sys.argv[1:]]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and range over rounds: the median resists outliers, the range shows the noise."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "rounds": len(values)}


def ratio(candidate: float, baseline: float) -> float:
    return candidate / baseline if baseline else float("inf")


def write_result(name: str, out: Path | None, data: dict[str, Any]) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now (a small race we accept in a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Waits until the child accepts connections; fails loudly if it died instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args!r} did not listen on 127.0.0.1:{port} in {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stops one child we started, by its PID: SIGTERM, then SIGKILL, and always waits."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def say(text: str) -> None:
    print(text, flush=True)


def event_loop_runner() -> asyncio.Runner:
    """A runner on uvloop (the exporter's loop) when it is installed, else asyncio's."""
    try:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        return asyncio.Runner()
