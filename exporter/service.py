"""The exporter process's engines, built from one config and re-applied on reload.

Data flows one way: config -> engines (collectors, health, history, custom
metrics) -> the scrape. The HTTP layer only reads from here and calls reload().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import Metric

from exporter import __version__, catalogue
from exporter.checks import state_dir_check, system_check
from exporter.collectors import Scrape, enabled_collectors
from exporter.collectors.system import CpuUsage, SystemSampler
from exporter.config import Config, ConfigError, load_config
from exporter.custom_metrics import CustomMetrics
from exporter.health import CheckResult, HealthEngine, Status
from exporter.history import History
from exporter.instruments import CounterVec, HistogramVec

log = logging.getLogger(__name__)


@dataclass
class Source:
    """An engine's state read at scrape time, timed like any collector."""

    name: str
    read: Callable[[], Iterable[Metric]]

    def collect(self) -> Iterable[Metric]:
        return self.read()


class Exporter:
    def __init__(self, config: Config):
        self.config = config
        mon = config["monitoring"]
        self.state_dir = Path(config["server"]["state_dir"])
        self.health = HealthEngine(config.seconds("monitoring", "health_check_interval"),
                                   config.seconds("monitoring", "health_check_timeout"),
                                   mon["failure_threshold"], mon["success_threshold"])
        self.history = History(config.seconds("monitoring", "retention_period"),
                               config.seconds("monitoring", "collection_interval"),
                               mon["history_max_entries"])
        self.custom = CustomMetrics(mon["custom_metrics"])
        self.http_requests = CounterVec("a3mailer_exporter_http_requests_total")
        self.http_duration = HistogramVec("a3mailer_exporter_http_request_duration_seconds")
        self.reload_ok = True
        self.reload_time = time.time()
        self.reload_problems: list[str] = []
        self.on_reload: list[Callable[[Config], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._history_wakeup = asyncio.Event()
        self.health.register("state_dir", state_dir_check(self.state_dir), critical=True)
        self.health.register("config", self._config_check)
        self._apply(config)

    # --- building from config

    def _apply(self, config: Config) -> None:
        mon = config["monitoring"]
        self.config = config
        self.health.configure(config.seconds("monitoring", "health_check_interval"),
                              config.seconds("monitoring", "health_check_timeout"),
                              mon["failure_threshold"], mon["success_threshold"])
        self.history.configure(config.seconds("monitoring", "retention_period"),
                               config.seconds("monitoring", "collection_interval"),
                               mon["history_max_entries"])
        self.custom.configure(mon["custom_metrics"])
        self.sampler = SystemSampler(mon)
        self._history_cpu = CpuUsage()
        if mon["enabled"]:
            self.health.register("system", system_check(self.sampler, mon["alert_thresholds"]))
        else:
            self.health.unregister("system")
        self.scrape = Scrape([
            *enabled_collectors(mon),
            Source("health", self.health.collect),
            Source("history", self.history.collect),
            Source("custom", self.custom.collect),
            Source("exporter", self._collect_self),
        ])

    def reload(self) -> list[str]:
        """Re-reads the config file; on any problem the running config stays. Returns them."""
        try:
            new = load_config(self.config.path, self.config.overrides)
        except ConfigError as exc:
            self.reload_ok = False
            self.reload_problems = [str(p) for p in exc.problems]
            log.error("config reload rejected; previous config keeps running",
                      extra={"problems": len(exc.problems), "first": self.reload_problems[0]})
            return self.reload_problems
        for key in ("listen_address", "state_dir", "tls"):
            if new["server"][key] != self.config["server"][key]:
                log.warning("changing server.%s needs a restart; keeping the old value", key)
                new.data["server"][key] = self.config["server"][key]
        self._apply(new)
        for callback in self.on_reload:
            callback(new)
        self.reload_ok, self.reload_time, self.reload_problems = True, time.time(), []
        log.info("config reloaded", extra={"source": new.source})
        self.health.wake()
        self._history_wakeup.set()
        return []

    async def _config_check(self) -> CheckResult:
        if self.reload_ok:
            return CheckResult(Status.HEALTHY, f"loaded from {self.config.source}")
        return CheckResult(Status.DEGRADED, "last reload rejected: " + self.reload_problems[0],
                           {"problems": self.reload_problems})

    # --- running

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._tasks = [asyncio.create_task(self.health.run_forever(), name="health"),
                       asyncio.create_task(self._record_history(), name="history")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _record_history(self) -> None:
        while True:
            entry: dict[str, object] = {
                "health": {c.name: str(c.status) for c in self.health.components.values()},
            }
            if self.config["monitoring"]["enabled"]:
                try:
                    entry["system"] = await asyncio.to_thread(self.sampler.snapshot,
                                                              self._history_cpu)
                except Exception:
                    log.exception("system snapshot failed")
            self.history.add(entry)
            self._history_wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._history_wakeup.wait(), self.history.interval)

    # --- the exporter's own metrics

    def _collect_self(self) -> Iterator[Metric]:
        info = catalogue.family("a3mailer_exporter_build_info")
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        yield catalogue.gauge("a3mailer_exporter_config_last_reload_successful",
                              1.0 if self.reload_ok else 0.0)
        yield catalogue.gauge("a3mailer_exporter_config_last_reload_success_timestamp_seconds",
                              self.reload_time)
        yield from self.http_requests.collect()
        yield from self.http_duration.collect()
