"""Protocol probes and the delivery round trip (blackbox_exporter's prober/ layout).

One file per protocol, each with `async def probe(target) -> ProbeResult`, mapped
from the `protocol:` value of a monitoring.probes item by the one table `PROBERS`.
TLS is a property of the target (`tls: none | starttls | implicit`), not a
protocol, so smtp covers 25, 587 and 465; imap 143 and 993; pop3 110 and 995; http
covers JMAP's /.well-known/jmap and the /healthz endpoints (with `path`).

Every target runs on its own `Periodic` (its interval, bounded by its timeout);
the scrape (`ProbesCollector`) and the health checks (`probe_check`) only read
the last outcome, so neither ever waits for a probe. `build_probes` turns the
monitoring config into a `Probes` object that service.py starts, stops, scrapes
and registers with the health engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.health import Check, CheckResult, Status
from exporter.probes import http, imap, pop3, smtp
from exporter.probes.delivery import DeliveryRoundtrip, DeliverySettings
from exporter.probes.target import (
    PHASES,
    TARGET_DEFAULTS,
    Credentials,
    ProbeResult,
    Target,
    TLSInfo,
    read_credentials,
)
from exporter.schedule import Outcome, Periodic

__all__ = [
    "PHASES",
    "PROBERS",
    "TARGET_DEFAULTS",
    "Credentials",
    "DeliveryRoundtrip",
    "DeliverySettings",
    "ProbeResult",
    "Probes",
    "ProbesCollector",
    "TLSInfo",
    "Target",
    "build_probes",
    "probe_check",
    "read_credentials",
]

PROBERS: dict[str, Callable[[Target], Awaitable[ProbeResult]]] = {
    "smtp": smtp.probe,
    "imap": imap.probe,
    "pop3": pop3.probe,
    "http": http.probe,
}

DELIVERY_COMPONENT = "delivery_roundtrip"  # its health component
SCHEDULE_SLACK = 1.0  # a Periodic's timeout exceeds the probe's own, so the probe says why


def _result(outcome: Outcome[ProbeResult]) -> ProbeResult:
    """The outcome's result; a run the scheduler cut off (or that raised) as a failure."""
    if outcome.value is not None:
        return outcome.value
    return ProbeResult(success=False, reason=outcome.error or "no result",
                       phases={"total": outcome.duration})


def probe_check(periodic: Periodic[ProbeResult]) -> Check:
    """A health check that reads the probe's last result; it never runs the probe."""

    async def check() -> CheckResult:
        outcome = periodic.last
        if outcome.runs == 0:
            return CheckResult(Status.UNKNOWN, "not probed yet")
        result = _result(outcome)
        details = {**result.as_dict(), "last_run": outcome.started, "runs": outcome.runs,
                   "failures": outcome.failures}
        if result.success:
            total = result.phases.get("total", outcome.duration)
            return CheckResult(Status.HEALTHY, f"succeeded in {total:.3f}s", details)
        return CheckResult(Status.UNHEALTHY, result.reason, details)

    return check


class Probes:
    """The scheduled probe targets and the delivery round trip of one config."""

    def __init__(self, targets: list[Target], delivery: DeliveryRoundtrip | None = None):
        self.targets = {t.name: t for t in targets}
        self.runs: dict[str, Periodic[ProbeResult]] = {
            t.name: Periodic(f"probe-{t.name}", _runner(t), t.interval,
                             t.timeout + SCHEDULE_SLACK)
            for t in targets}
        self.delivery = delivery
        self.delivery_run: Periodic[ProbeResult] | None = None
        if delivery is not None:
            self.delivery_run = Periodic("delivery-roundtrip", delivery.run,
                                         delivery.settings.interval, delivery.schedule_timeout)
        self.collector = ProbesCollector(self)
        self.running = False
        self._retiring: set[asyncio.Task[None]] = set()

    def schedules(self) -> list[Periodic[ProbeResult]]:
        runs = list(self.runs.values())
        return runs + ([self.delivery_run] if self.delivery_run is not None else [])

    def checks(self) -> dict[str, Check]:
        """Health component name -> check: one per target (named after it), and the round trip."""
        checks = {name: probe_check(run) for name, run in self.runs.items()}
        if self.delivery_run is not None:
            checks[DELIVERY_COMPONENT] = probe_check(self.delivery_run)
        return checks

    def start(self) -> None:
        """Starts every schedule (inside the running event loop)."""
        self.running = True
        for periodic in self.schedules():
            periodic.start()

    async def stop(self) -> None:
        self.running = False
        for periodic in self.schedules():
            await periodic.stop()

    def retire(self, keep: Collection[int] = ()) -> None:
        """Stops the schedules not in `keep` (ids) without waiting: for a reload, which
        is synchronous. The stop tasks are held here until they finish."""
        if not self.running:
            return
        self.running = False
        loop = asyncio.get_running_loop()
        for periodic in self.schedules():
            if id(periodic) not in keep:
                task = loop.create_task(periodic.stop())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    def adopt(self, previous: Probes) -> set[int]:
        """Takes over the schedules (and so the last results and the round trip's
        histogram) of targets whose config did not change; returns their ids."""
        kept: set[int] = set()
        for name, target in self.targets.items():
            if previous.targets.get(name) == target:
                self.runs[name] = previous.runs[name]
                kept.add(id(self.runs[name]))
        if (self.delivery is not None and previous.delivery is not None
                and previous.delivery_run is not None
                and previous.delivery.settings == self.delivery.settings):
            self.delivery, self.delivery_run = previous.delivery, previous.delivery_run
            kept.add(id(self.delivery_run))
        return kept


def _runner(target: Target) -> Callable[[], Awaitable[ProbeResult]]:
    prober = PROBERS[target.protocol]

    async def run() -> ProbeResult:
        return await prober(target)

    return run


def build_probes(monitoring: Mapping[str, Any], previous: Probes | None = None) -> Probes:
    """Probes from the monitoring config section (probes list, delivery object).

    With `previous` (a reload), unchanged targets keep their schedule and last result,
    the rest of `previous` is stopped, and when `previous` was running the result is
    started too (call this inside the event loop then). Otherwise call start() once the
    exporter runs. ValueError names a bad item (duplicate names included).
    """
    enabled = monitoring.get("enabled", True)
    targets: list[Target] = []
    for index, item in enumerate(monitoring.get("probes", []) if enabled else []):
        try:
            target = Target.from_config(item)
        except ValueError as exc:
            raise ValueError(f"monitoring.probes[{index}]: {exc}") from None
        if any(t.name == target.name for t in targets):
            raise ValueError(f"monitoring.probes[{index}]: name {target.name!r} used twice")
        targets.append(target)
    section = monitoring.get("delivery", {}) if enabled else {}
    delivery = None
    if section.get("enabled"):
        delivery = DeliveryRoundtrip(DeliverySettings.from_config(section))
    probes = Probes(targets, delivery)
    if previous is not None:
        was_running = previous.running
        previous.retire(keep=probes.adopt(previous))
        if was_running:
            probes.start()
    return probes


class ProbesCollector:
    """Reads the last outcome of every schedule at scrape time (name "probes")."""

    name = "probes"

    def __init__(self, probes: Probes):
        self.probes = probes

    def collect(self) -> Iterator[Metric]:
        success = catalogue.family("a3mailer_probe_success")
        duration = catalogue.family("a3mailer_probe_duration_seconds")
        not_after = catalogue.family("a3mailer_tls_cert_not_after_timestamp_seconds")
        version = catalogue.family("a3mailer_probe_tls_version_info")
        verified = catalogue.family("a3mailer_probe_tls_verified")
        status = catalogue.family("a3mailer_probe_http_status_code")
        for name, run in list(self.probes.runs.items()):
            if run.last.runs == 0:
                continue  # absent until the first run: unknown, not failed
            result = _result(run.last)
            protocol = self.probes.targets[name].protocol
            success.add_metric([name, protocol], 1.0 if result.success else 0.0)
            for phase, seconds in result.phases.items():
                duration.add_metric([name, protocol, phase], seconds)
            tls = result.tls
            if tls is not None:
                if tls.cert_not_after is not None:
                    not_after.add_metric([name], tls.cert_not_after)
                if tls.version:
                    version.add_metric([name, tls.version], 1.0)
                verified.add_metric([name], 1.0 if tls.verified else 0.0)
            code = result.details.get("status_code")
            if isinstance(code, int):
                status.add_metric([name], float(code))
        yield from (success, duration, not_after, version, verified, status)
        yield from self._delivery()

    def _delivery(self) -> Iterator[Metric]:
        roundtrip, run = self.probes.delivery, self.probes.delivery_run
        if roundtrip is None or run is None:
            return
        yield from roundtrip.roundtrips.collect()
        yield catalogue.single("a3mailer_delivery_roundtrip_pending_messages",
                               float(len(roundtrip.pending)))
        if run.last.runs == 0:
            return
        result = _result(run.last)
        yield catalogue.single("a3mailer_delivery_roundtrip_success",
                               1.0 if result.success else 0.0)
        seconds = result.details.get("roundtrip_seconds")
        if result.success and isinstance(seconds, float):
            yield catalogue.single("a3mailer_delivery_roundtrip_last_seconds", seconds)
