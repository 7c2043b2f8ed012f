"""The mail-monitoring engines of one config: probes, the delivery round trip, mail DNS
and DNSBL checks, queues, Stalwart's metrics and log ingestion.

Each runs on its own schedule (`Periodic`, or the log follower's poll loop); the
scrape and the health checks only read their last results. `apply()` builds them
from the monitoring section and, on a reload, keeps every part whose settings did
not change (its schedule, last result and counters) and replaces the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from exporter.collectors import Collector
from exporter.collectors.logs import AuthSink, LogIngestion
from exporter.collectors.queues import QueuesCollector, QueueSnapshot, queue_check, queue_sources
from exporter.collectors.stalwart import (
    StalwartCollector,
    StalwartSnapshot,
    stalwart_metrics_source,
    stalwart_ready_check,
)
from exporter.config import parse_duration
from exporter.health import Check
from exporter.probes import DELIVERY_COMPONENT, Probes, build_probes
from exporter.probes.dns import DnsChecks, DnsSettings
from exporter.probes.dnsbl import Dnsbl, DnsblSettings
from exporter.schedule import Periodic

log = logging.getLogger(__name__)

# Health components this module registers besides one per probe target; a probe may
# not take one of these names (the config loader says so).
COMPONENTS = (DELIVERY_COMPONENT, "dns", "dnsbl", "queues", "stalwart")

# The keys of monitoring.stalwart that make the connection monitoring.queues.stalwart uses.
STALWART_CONNECTION = ("url", "username", "password_file", "password_env", "token_file",
                       "token_env", "timeout")


def stalwart_queue_section(monitoring: Mapping[str, Any]) -> dict[str, Any]:
    """monitoring.queues with its stalwart part completed by monitoring.stalwart's connection."""
    queues = dict(monitoring["queues"])
    connection = {k: monitoring["stalwart"][k] for k in STALWART_CONNECTION}
    queues["stalwart"] = {**connection, **queues["stalwart"]}
    return queues


class MailMonitoring:
    def __init__(self, state_dir: Path, on_auth: AuthSink | None = None):
        self.state_dir = state_dir
        self.probes = Probes([])
        self.dns: DnsChecks | None = None
        self.dnsbl: Dnsbl | None = None
        self.queues: dict[str, Periodic[QueueSnapshot]] = {}
        self.stalwart: Periodic[StalwartSnapshot] | None = None
        self.logs = LogIngestion(on_auth=on_auth)
        self.running = False
        self._built_from: dict[str, Any] = {}  # part -> the settings it was built from
        self._stopping: set[asyncio.Task[None]] = set()

    # --- building

    def apply(self, monitoring: Mapping[str, Any]) -> None:
        """Builds (or, on reload, rebuilds what changed) from the validated monitoring section.

        Inside a running event loop the new parts start at once and the replaced ones are
        stopped in the background, because a reload is synchronous.
        """
        enabled = monitoring["enabled"]
        self.probes = build_probes(monitoring, previous=self.probes)
        self.dns = self._rebuild("dns", monitoring["dns"] if enabled and monitoring["dns"][
            "domains"] else None, self.dns, lambda s: DnsChecks(
                DnsSettings.from_config(s, parse_duration)))
        self.dnsbl = self._rebuild("dnsbl", monitoring["dnsbl"] if enabled and monitoring[
            "dnsbl"]["ip_sets"] else None, self.dnsbl, lambda s: Dnsbl(
                DnsblSettings.from_config(s, parse_duration)))
        queues = stalwart_queue_section(monitoring)
        if self._changed("queues", queues if enabled else None):
            for source in self.queues.values():
                self._stop_later(source.stop())
            self.queues = queue_sources(queues) if enabled else {}
            if self.running:
                for source in self.queues.values():
                    source.start()
        stalwart = monitoring["stalwart"]
        if self._changed("stalwart", stalwart if enabled and stalwart["enabled"] else None):
            if self.stalwart is not None:
                self._stop_later(self.stalwart.stop())
            self.stalwart = (stalwart_metrics_source(stalwart)
                             if enabled and stalwart["enabled"] else None)
            if self.running and self.stalwart is not None:
                self.stalwart.start()
        logs = monitoring["logs"] if enabled else {"files": []}
        self.logs.configure(dict(logs), self.state_dir)

    def _changed(self, part: str, settings: Any) -> bool:
        if part in self._built_from and self._built_from[part] == settings:
            return False
        self._built_from[part] = settings
        return True

    def _rebuild(self, part: str, settings: Any, current: Any,
                 build: Callable[[Any], Any]) -> Any:
        """The part for `settings` (None: off): `current` when they did not change."""
        if not self._changed(part, settings):
            return current
        if current is not None:
            self._stop_later(current.stop())
        new = build(settings) if settings is not None else None
        if self.running and new is not None:
            new.start()
        return new

    def _stop_later(self, stopping: Awaitable[None]) -> None:
        """Stops a replaced part in the background (apply() is synchronous)."""
        if not _loop_running():  # never started, so nothing to stop
            _close(stopping)
            return
        task = asyncio.ensure_future(stopping)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    # --- what the exporter reads

    def collectors(self) -> list[Collector]:
        """Collectors that read the last results (never run a probe)."""
        out: list[Collector] = [self.probes.collector]
        out += [part for part in (self.dns, self.dnsbl) if part is not None]
        if self.queues:
            out.append(QueuesCollector(self.queues))
        if self.stalwart is not None:
            out.append(StalwartCollector(self.stalwart))
        if self.logs.sources:
            out.append(self.logs)
        return out

    def checks(self, monitoring: Mapping[str, Any]) -> dict[str, Check]:
        """Health component name -> check, all non-critical: the exporter stays ready
        while a mail service it watches is down (that is what it reports)."""
        checks = self.probes.checks()
        if self.dns is not None:
            checks["dns"] = self.dns.health_check
        if self.dnsbl is not None:
            checks["dnsbl"] = self.dnsbl.health_check
        if self.queues:
            checks["queues"] = queue_check(
                self.queues, monitoring["alert_thresholds"]["queue_size_threshold"])
        if self.stalwart is not None:
            checks["stalwart"] = stalwart_ready_check(monitoring["stalwart"])
        return checks

    # --- running

    async def start(self) -> None:
        self.running = True
        self.probes.start()
        for part in (self.dns, self.dnsbl):
            if part is not None:
                part.start()
        for source in self.queues.values():
            source.start()
        if self.stalwart is not None:
            self.stalwart.start()
        await self.logs.start()

    async def stop(self) -> None:
        self.running = False
        await self.probes.stop()
        for part in (self.dns, self.dnsbl):
            if part is not None:
                await part.stop()
        for source in self.queues.values():
            await source.stop()
        if self.stalwart is not None:
            await self.stalwart.stop()
        await self.logs.stop()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _close(stopping: Awaitable[None]) -> None:
    """A stop() coroutine of a part that never started has nothing to stop."""
    close = getattr(stopping, "close", None)
    if close is not None:
        close()
