"""The built-in health checks: the host against the alert thresholds, and the state dir."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from exporter.collectors.system import CpuUsage, SystemSampler
from exporter.health import Check, CheckResult, Status


def system_check(sampler: SystemSampler, thresholds: dict[str, Any],
                 cpu: CpuUsage | None = None) -> Check:
    """Degraded while CPU, memory or any filesystem is above its alert threshold; the CPU
    share is the one since `cpu`'s last reading (a new CpuUsage: since now)."""
    cpu = cpu if cpu is not None else CpuUsage()

    def measure() -> CheckResult:
        snap = sampler.snapshot(cpu)
        worst_disk = max(snap["disk_usage_ratio"].items(), key=lambda kv: kv[1],
                         default=("", 0.0))
        readings = {
            "cpu_usage_percent": (snap["cpu_usage_ratio"] * 100, thresholds["cpu_usage_threshold"]),
            "memory_usage_percent": (snap["memory_usage_ratio"] * 100,
                                     thresholds["memory_usage_threshold"]),
            "disk_usage_percent": (worst_disk[1] * 100, thresholds["disk_usage_threshold"]),
        }
        over = [f"{name.removesuffix('_percent').replace('_', ' ')} {value:.1f}% > {limit}%"
                + (f" on {worst_disk[0]}" if name.startswith("disk") else "")
                for name, (value, limit) in readings.items() if value > limit]
        details = {name: round(value, 2) for name, (value, _) in readings.items()}
        details["load1"] = snap["load1"]
        if over:
            return CheckResult(Status.DEGRADED, "; ".join(over), details)
        return CheckResult(Status.HEALTHY, "within thresholds", details)

    async def check() -> CheckResult:
        return await asyncio.to_thread(measure)

    return check


def state_dir_check(path: Path) -> Check:
    """Unhealthy when the state dir cannot take a durable write: state would not survive.

    Each round writes a new file and renames it over the last one, so the write needs
    a free block (rewriting one file in place would reuse its block and pass on a full
    filesystem)."""
    probe = path / ".health-probe"
    fresh = path / ".health-probe.new"

    def write() -> CheckResult:
        data = os.urandom(16)
        with open(fresh, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(fresh, probe)
        if probe.read_bytes() != data:
            return CheckResult(Status.UNHEALTHY, "state dir returned different bytes")
        return CheckResult(Status.HEALTHY, "writable", {"path": str(path)})

    async def check() -> CheckResult:
        try:
            return await asyncio.to_thread(write)
        except OSError as exc:
            return CheckResult(Status.UNHEALTHY, f"cannot write {path}: {exc.strerror}",
                               {"path": str(path)})

    return check


def security_store_check(engine: Any) -> Check:
    """Unhealthy when the security store does not answer (the engine then fails open or
    closed, as security.store.fail_open says); degraded while changes wait for a disk
    that refused them."""

    async def check() -> CheckResult:
        start = time.monotonic()
        await engine.store.failure_count("health-check", engine.clock(), 1.0)
        backend = getattr(engine.store, "inner", engine.store)  # not the timing wrapper
        details = {"store": type(backend).__name__, "tracked_keys": engine.store.tracked_keys(),
                   "round_trip_ms": round((time.monotonic() - start) * 1000, 3)}
        waiting = len(getattr(backend, "unwritten", ()))  # SqliteStore: the disk refused them
        if waiting:
            return CheckResult(Status.DEGRADED, f"{waiting} changes to locks and bans wait "
                               "for the disk (enforced from memory meanwhile)",
                               {**details, "unwritten_changes": waiting})
        return CheckResult(Status.HEALTHY, "store answers", details)

    return check
