"""The health engine: components register checks; statuses change only on streaks.

Each check runs every monitoring.health_check_interval with a timeout. A worse
status needs `failure_threshold` results in a row and a better one
`success_threshold` (a component's first result is taken at once), so one slow
answer does not flap /readyz. /readyz is 200 only while every critical
component is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.schedule import bounded

log = logging.getLogger(__name__)


class Status(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


_SEVERITY = {Status.HEALTHY: 0, Status.UNKNOWN: 1, Status.DEGRADED: 2, Status.UNHEALTHY: 3}


@dataclass
class CheckResult:
    status: Status
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


Check = Callable[[], Awaitable[CheckResult]]


@dataclass
class Component:
    name: str
    check: Check
    critical: bool = False
    status: Status = Status.UNKNOWN
    message: str = "not checked yet"
    details: dict[str, Any] = field(default_factory=dict)
    response_time_ms: float = 0.0
    timestamp: float = 0.0
    _pending: Status | None = None
    _pending_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        details = dict(self.details)
        if self._pending is not None:
            details["pending_status"] = str(self._pending)
            details["pending_count"] = self._pending_count
        return {
            "component": self.name,
            "status": str(self.status),
            "critical": self.critical,
            "message": self.message,
            "response_time_ms": round(self.response_time_ms, 3),
            "details": details,
            "timestamp": self.timestamp,
        }


class HealthEngine:
    def __init__(self, interval: float, timeout: float, failure_threshold: int = 3,
                 success_threshold: int = 1):
        self.components: dict[str, Component] = {}
        self.configure(interval, timeout, failure_threshold, success_threshold)
        self._wakeup = asyncio.Event()

    def configure(self, interval: float, timeout: float, failure_threshold: int,
                  success_threshold: int) -> None:
        """Applies new settings (also on reload); the next round uses them."""
        self.interval = interval
        self.timeout = timeout
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold

    def register(self, name: str, check: Check, critical: bool = False) -> Component:
        """Adds a component, or swaps the check of an existing one keeping its status."""
        component = self.components.get(name)
        if component is None:
            component = self.components[name] = Component(name, check, critical)
        else:
            component.check, component.critical = check, critical
        return component

    def unregister(self, name: str) -> None:
        self.components.pop(name, None)

    def record(self, component: Component, result: CheckResult, elapsed: float) -> None:
        """Applies one check result to the component's status, honouring the streak rule."""
        component.message = result.message
        component.details = result.details
        component.response_time_ms = elapsed * 1000.0
        component.timestamp = time.time()
        new = result.status
        if component.status is Status.UNKNOWN or new is component.status:
            if new is not component.status:
                log.info("health status changed", extra={"component": component.name,
                                                          "status": str(new)})
            component.status, component._pending, component._pending_count = new, None, 0
            return
        if new is component._pending:
            component._pending_count += 1
        else:
            component._pending, component._pending_count = new, 1
        worse = _SEVERITY[new] > _SEVERITY[component.status]
        needed = self.failure_threshold if worse else self.success_threshold
        if component._pending_count >= needed:
            log.info("health status changed", extra={
                "component": component.name, "status": str(new), "was": str(component.status)})
            component.status, component._pending, component._pending_count = new, None, 0

    async def check_one(self, component: Component) -> None:
        start = time.perf_counter()
        try:
            result = await bounded(component.check(), self.timeout)
        except TimeoutError:
            result = CheckResult(Status.UNHEALTHY, f"check timed out after {self.timeout:g}s")
        except Exception as exc:
            result = CheckResult(Status.UNHEALTHY, f"check failed: {exc}")
        self.record(component, result, time.perf_counter() - start)

    async def run_once(self) -> None:
        await asyncio.gather(*(self.check_one(c) for c in list(self.components.values())))

    async def run_forever(self) -> None:
        while True:
            await self.run_once()
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await bounded(self._wakeup.wait(), self.interval)

    def wake(self) -> None:
        """Runs the next round now (after a reload, say)."""
        self._wakeup.set()

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every critical component is healthy; otherwise the reasons."""
        reasons = [f"{c.name} is {c.status}: {c.message}" for c in self.components.values()
                   if c.critical and c.status is not Status.HEALTHY]
        return not reasons, reasons

    def overall(self) -> Status:
        """The worst status of all components (unknown only before any check)."""
        statuses = [c.status for c in self.components.values()]
        if not statuses:
            return Status.HEALTHY
        return max(statuses, key=lambda s: _SEVERITY[s])

    def report(self) -> dict[str, Any]:
        return {
            "status": str(self.overall()),
            "ready": self.ready()[0],
            "timestamp": time.time(),
            "components": [c.as_dict() for c in self.components.values()],
        }

    def collect(self) -> Iterator[Metric]:
        status = catalogue.family("a3mailer_health_status")
        duration = catalogue.family("a3mailer_health_check_duration_seconds")
        stamp = catalogue.family("a3mailer_health_check_timestamp_seconds")
        for c in list(self.components.values()):
            for s in Status:
                status.add_metric([c.name, str(s)], 1.0 if c.status is s else 0.0)
            duration.add_metric([c.name], c.response_time_ms / 1000.0)
            stamp.add_metric([c.name], c.timestamp)
        yield from (status, duration, stamp)
        yield catalogue.single("a3mailer_exporter_ready", 1.0 if self.ready()[0] else 0.0)
