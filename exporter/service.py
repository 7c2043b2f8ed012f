"""The exporter process's engines, built from one config and re-applied on reload.

Data flows one way: config -> engines (collectors, health, history, custom
metrics, performance monitor, tracing) -> the scrape. The HTTP layer only reads
from here and calls reload().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from exporter import __version__, catalogue, logs, tracing
from exporter.alerts import AlertEngine
from exporter.checks import security_store_check, state_dir_check, system_check
from exporter.collectors import Scrape, enabled_collectors
from exporter.collectors.identity import IdentityCollector
from exporter.collectors.mfa import MfaCollector
from exporter.collectors.security import SecurityCollector
from exporter.collectors.system import CpuUsage, SystemSampler
from exporter.config import Config, ConfigError, load_config, parse_duration, read_secret
from exporter.custom_metrics import CustomMetrics
from exporter.health import CheckResult, HealthEngine, Status
from exporter.history import History
from exporter.identity import IdentityServices
from exporter.instruments import CounterVec
from exporter.mail import MailMonitoring
from exporter.performance import PerformanceMonitor
from exporter.schedule import bounded
from exporter.tracing import ObservedStore, Tracing, TracingSettings, security_observer
from security.attempts import Attempt
from security.audit import AuditLog, AuditPolicy
from security.engine import SecurityManager, record_audit
from security.mfa.delivery import Sender
from security.mfa.email import EmailSender, SmtpRelay
from security.mfa.manager import MfaManager
from security.mfa.sealing import Sealer, load_or_create_key
from security.mfa.settings import MfaSettings
from security.mfa.sms import SmsProvider, SmsSender
from security.protocols.postfix import PostfixPolicyServer
from security.ratelimit import Limit
from security.settings import Settings
from security.store import open_store

log = logging.getLogger(__name__)

TRACING_SHUTDOWN_TIMEOUT = 5.0
# keys a reload cannot change (sockets, files and stores opened at start): a reload keeps
# their running values and logs that it did
RESTART_ONLY: tuple[tuple[str, ...], ...] = (
    ("server", "listen_address"), ("server", "state_dir"), ("server", "tls"),
    ("server", "graceful_shutdown_timeout"), ("monitoring", "health_endpoint_path"),
    ("security", "enabled"), ("security", "store"),
    ("security", "postfix_policy", "enabled"), ("security", "postfix_policy", "listen"),
    ("security", "audit_config", "file"), ("security", "audit_config", "stdout"),
    ("security", "audit_config", "fsync_interval"),
    ("security", "mfa", "enabled"), ("security", "mfa", "encryption_key_file"),
    ("security", "mfa", "encryption_key_env"))


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
        # every engine's samples (HTTP latency per route among them) and its spans
        self.performance = PerformanceMonitor()
        self.tracing = Tracing(TracingSettings.from_config(config["tracing"]))
        tracing.install(self.performance, self.tracing)
        self.reload_ok = True
        self.reload_time = time.time()
        self.reload_problems: list[str] = []
        self.on_reload: list[Callable[[Config], None]] = []
        self._reload_pending = False  # reload_soon() has one scheduled
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._history_wakeup = asyncio.Event()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.security_frontends = CounterVec("a3mailer_security_frontend_requests_total")
        self.rate_limited = CounterVec("a3mailer_security_rate_limited_total")
        self.audit, self.security = _build_security(config, self.state_dir)
        self.mfa = _build_mfa(config, self.state_dir, self.security, self.audit)
        self.identity = IdentityServices(config, self.state_dir, self.security.store,
                                         self.audit) if self.security is not None else None
        self.postfix_policy = PostfixPolicyServer(self.security, None) if (
            self.security is not None) else None
        self.mail = MailMonitoring(self.state_dir, self._report_logged_login
                                   if self.security is not None else None)
        self._mail_components: set[str] = set()
        # the threshold alert engine (alerting.engine): the rules' threshold alerts in process
        self.alerts = AlertEngine(self.state_dir)
        self.health.register("state_dir", state_dir_check(self.state_dir), critical=True)
        self.health.register("config", self._config_check)
        # CPU busy shares between two readings: kept across reloads, whose first reading
        # would otherwise cover the microseconds since the reload
        self._health_cpu, self._history_cpu = CpuUsage(), CpuUsage()
        self._apply(config)

    # --- building from config

    def _apply(self, config: Config) -> None:
        mon = config["monitoring"]
        self.config = config
        self.health.configure(config.seconds("monitoring", "health_check_interval"),
                              config.seconds("monitoring", "health_check_timeout"),
                              mon["failure_threshold"], mon["success_threshold"])
        self._configure_tracing(config)
        self.sampler = SystemSampler(mon)
        if mon["enabled"]:
            self.health.register("system", system_check(self.sampler, mon["alert_thresholds"],
                                                        self._health_cpu))
        else:
            self.health.unregister("system")
        if self.security is not None:
            self.security.configure(Settings.from_config(config["security"], parse_duration))
            if self.postfix_policy is not None:
                settings = config["security"]["postfix_policy"]
                self.postfix_policy.limits = _postfix_limit(settings)
                self.postfix_policy.idle_timeout = parse_duration(settings["idle_timeout"])
                self.postfix_policy.max_connections = settings["max_connections"]
            # a fail-closed engine refuses every login while its store is down: not ready
            self.health.register("security_store", security_store_check(self.security),
                                 critical=not config["security"]["store"]["fail_open"])
        if self.audit is not None:
            self.audit.policy = _audit_policy(config["security"])
        self.mail.apply(mon)
        mail_checks = self.mail.checks(mon)
        for name in self._mail_components - mail_checks.keys():
            self.health.unregister(name)
        for name, check in mail_checks.items():
            self.health.register(name, check)
        self._mail_components = set(mail_checks)
        security_sources: list[Any] = [SecurityCollector(
            self.security, self.audit, self.security_frontends, self.postfix_policy)
        ] if self.security is not None else []
        if self.mfa is not None and self.security is not None:
            _configure_mfa(self.mfa, self.security, config["security"])
            security_sources.append(MfaCollector(self.mfa))
        identity_sources = []
        if self.identity is not None:
            self.identity.configure(config)
            identity_sources.append(IdentityCollector(self.identity))
        sources = [
            *self.mail.collectors(),
            *security_sources,
            *identity_sources,
            Source("health", self.health.collect),
            Source("history", self.history.collect),
            Source("custom", self.custom.collect),
            Source("performance", self.performance.collect),
            Source("tracing", self.tracing.collect),
            Source("exporter", self._collect_self),
        ]
        self.scrape = Scrape([*enabled_collectors(mon), *sources,
                              Source("alerts", self.alerts.collect)])
        # the engine reads what a scrape reads, through its own collector instances (the CPU
        # usage is measured between one reader's calls)
        self.alerts.configure(config, Scrape([*enabled_collectors(mon), *sources]).collect)
        # last: their data (the history ring, custom metric values) is cut to the new
        # config, which a step failing before them must not have done
        self.history.configure(config.seconds("monitoring", "retention_period"),
                               config.seconds("monitoring", "collection_interval"),
                               mon["history_max_entries"])
        self.custom.configure(mon["custom_metrics"])

    def _configure_tracing(self, config: Config) -> None:
        """A changed tracing section gets a new provider; the old one exports what it
        holds and stops on a worker thread, so a reload never waits for the receiver."""
        settings = TracingSettings.from_config(config["tracing"])
        if settings == self.tracing.settings:
            return
        old, self.tracing = self.tracing, Tracing(settings, counts=self.tracing.counts)
        tracing.install(self.performance, self.tracing)
        threading.Thread(target=old.shutdown, name="tracing-shutdown", daemon=True).start()
        log.info("tracing reconfigured", extra={"enabled": settings.enabled,
                                                "sampling_rate": settings.sampling_rate})

    def reload(self, actor: str = "signal") -> list[str]:
        """Re-reads the config file; on any problem the running config stays. Returns them."""
        try:
            new = load_config(self.config.path, self.config.overrides)
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
        except Exception as exc:  # a loader bug: still a refused file, never a half reload
            log.exception("reading the config raised")
            problems = [f"{self.config.source}: reading the config failed: "
                        f"{type(exc).__name__}"]
        else:
            problems = []
        if problems:
            self.reload_ok = False
            self.reload_problems = problems
            log.error("config reload rejected; previous config keeps running",
                      extra={"problems": len(problems), "first": problems[0]})
            self._audit_reload(actor, False, problems)
            return problems
        for path in RESTART_ONLY:
            *parents, key = path
            old_section, new_section = self.config.data, new.data
            for part in parents:
                old_section, new_section = old_section[part], new_section[part]
            if new_section[key] != old_section[key]:
                log.warning("changing %s needs a restart; keeping the old value", ".".join(path))
                new_section[key] = old_section[key]
        old = self.config
        if new["logging"] != old["logging"]:
            logs.setup(new["logging"]["level"], new["logging"]["format"])
        try:
            self._apply(new)
            for callback in self.on_reload:
                callback(new)
        except Exception as exc:  # a check the loader lacks: the old config, whole, again
            log.exception("config reload failed while applying; previous config restored")
            self._apply(old)
            for callback in self.on_reload:
                callback(old)
            self.reload_ok = False
            self.reload_problems = [f"{new.source}: applying the config failed: "
                                    f"{type(exc).__name__}: {exc}"]
            self._audit_reload(actor, False, self.reload_problems)
            return self.reload_problems
        self.reload_ok, self.reload_time, self.reload_problems = True, time.time(), []
        log.info("config reloaded", extra={"source": new.source})
        self._audit_reload(actor, True, [])
        self.health.wake()
        self._history_wakeup.set()
        return []

    def reload_soon(self) -> None:
        """SIGHUP: one reload on the event loop's next round; signals that arrive before
        it runs join it (it reads the file then, so none is lost). One reload per signal,
        back to back, held the loop for the whole storm: /livez took 2.4 s after 300
        SIGHUPs, each reload about 8 ms."""
        if self._reload_pending:
            return
        self._reload_pending = True
        asyncio.get_running_loop().call_soon(self._pending_reload)

    def _pending_reload(self) -> None:
        self._reload_pending = False
        self.reload()

    def _audit_reload(self, actor: str, ok: bool, problems: list[str]) -> None:
        record_audit(self.audit, "config.reload", actor, self.config.source,
                     {"ok": ok, "problems": problems[:10]})

    async def _config_check(self) -> CheckResult:
        if self.reload_ok:
            return CheckResult(Status.HEALTHY, f"loaded from {self.config.source}")
        return CheckResult(Status.DEGRADED, "last reload rejected: " + self.reload_problems[0],
                           {"problems": self.reload_problems})

    # --- running

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.security is not None:
            await self.security.start()
        if self.identity is not None:
            await self.identity.start()
        policy = self.config["security"]["postfix_policy"]
        if self.postfix_policy is not None and policy["enabled"]:
            from exporter.cli import split_listen

            host, port = await self.postfix_policy.start(*split_listen(policy["listen"]))
            log.info("postfix policy server listening", extra={"listen": f"{host}:{port}"})
        await self.mail.start()
        await self.alerts.start()
        self._tasks = [asyncio.create_task(self.health.run_forever(), name="health"),
                       asyncio.create_task(self._record_history(), name="history")]
        if self.audit is not None:
            self._tasks.append(asyncio.create_task(
                self._maintain_audit(self.audit.fsync_interval), name="audit"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.alerts.stop()
        await self.mail.stop()
        if self.postfix_policy is not None:
            await self.postfix_policy.stop()
        if self.identity is not None:
            await self.identity.stop()
        if self.security is not None:
            await self.security.stop()
        if self.audit is not None:
            self.audit.close()
        # queued spans get one export attempt; a dead or slow receiver does not hold up
        # the exit: the export runs on a daemon thread, waited for at most the timeout
        # (on an executor's thread, the interpreter would wait for it at exit in full)
        flush = threading.Thread(target=self.tracing.shutdown, name="tracing-shutdown",
                                 daemon=True)
        flush.start()
        await asyncio.to_thread(flush.join, TRACING_SHUTDOWN_TIMEOUT)

    async def _report_logged_login(self, login: str, remote_ip: str, protocol: str,
                                   success: bool) -> None:
        """Log ingestion's logins reach the engine like any front end's reports."""
        assert self.security is not None
        await self.security.report(Attempt(login=login, remote_ip=remote_ip,
                                           protocol=protocol), success)

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
                await bounded(self._history_wakeup.wait(), self.history.interval)

    async def _maintain_audit(self, sync_every: float = 1.0, check_every: float = 3600.0) -> None:
        """fsync the audit log every sync_every seconds (for a quiet log: a busy one syncs
        itself at its next record); verify and purge it at start and hourly."""
        assert self.audit is not None
        audit = self.audit
        last_check = -check_every
        while True:
            try:
                if time.monotonic() - last_check >= check_every:
                    last_check = time.monotonic()
                    result = await asyncio.to_thread(audit.verify)
                    if result.ok:
                        await asyncio.to_thread(audit.purge)
                await asyncio.to_thread(audit.sync)
            except Exception:
                log.exception("audit log maintenance failed")
            await asyncio.sleep(sync_every)

    # --- the exporter's own metrics

    def _collect_self(self) -> Iterator[Metric]:
        info = catalogue.family("a3mailer_exporter_build_info")
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        yield catalogue.single("a3mailer_exporter_config_last_reload_successful",
                              1.0 if self.reload_ok else 0.0)
        yield catalogue.single("a3mailer_exporter_config_last_reload_success_timestamp_seconds",
                              self.reload_time)
        if self._loop is not None:
            yield catalogue.single("a3mailer_exporter_asyncio_tasks",
                                   float(len(asyncio.all_tasks(self._loop))))
        yield from self.http_requests.collect()
        yield from self.rate_limited.collect()


def _postfix_limit(settings: dict[str, Any]) -> Limit | None:
    per_hour = settings["recipients_per_hour"]
    return Limit(per_hour, 3600.0, settings["burst"]) if per_hour else None


def _audit_policy(security: dict[str, Any]) -> AuditPolicy:
    audit = security["audit_config"]
    return AuditPolicy(
        enabled=audit["enabled"],
        log_successful_auth=audit["log_successful_auth"],
        log_failed_auth=audit["log_failed_auth"],
        log_privilege_escalation=audit["log_privilege_escalation"],
        log_data_access=audit["log_data_access"],
        log_config_changes=audit["log_config_changes"],
        retention_seconds=parse_duration(audit["retention_period"]),
    )


def _build_security(config: Config, state_dir: Path
                    ) -> tuple[AuditLog | None, SecurityManager | None]:
    """The audit log and the engine with its store, when security.enabled."""
    security = config["security"]
    if not security["enabled"]:
        return None, None
    audit_config = security["audit_config"]
    audit_path = Path(audit_config["file"]) if audit_config["file"] else state_dir / "audit.log"
    audit = AuditLog(audit_path.parent, _audit_policy(security), filename=audit_path.name,
                     sink=sys.stdout if audit_config["stdout"] else None,
                     fsync_interval=parse_duration(audit_config["fsync_interval"]))
    store_config = security["store"]
    store = open_store(store_config["type"],
                       path=store_config["path"] or str(state_dir / "security.db"),
                       max_keys=store_config["max_tracked_keys"],
                       flush_interval=parse_duration(store_config["flush_interval"]),
                       url=store_config["redis_url"],
                       password=read_secret(store_config, "redis_password"),
                       prefix=store_config["redis_key_prefix"])
    # every store call timed and traced (path store); the engine reports its decisions
    engine = SecurityManager(Settings.from_config(security, parse_duration),
                             ObservedStore(store), audit, observer=security_observer)
    return audit, engine


# --- MFA (security.mfa)


def _build_mfa(config: Config, state_dir: Path, engine: SecurityManager | None,
               audit: AuditLog | None) -> MfaManager | None:
    """The MFA manager on the engine's store, when security and security.mfa are enabled."""
    mfa = config["security"]["mfa"]
    if engine is None or not mfa["enabled"]:
        return None
    material = read_secret(mfa, "encryption_key") or load_or_create_key(state_dir / "mfa.key")
    try:
        sealer = Sealer(material)
    except ValueError as exc:
        raise ValueError(f"security.mfa.encryption_key_file: {exc}") from None
    return MfaManager(_mfa_settings(mfa), engine.store, sealer, audit)


def _mfa_settings(mfa: dict[str, Any]) -> MfaSettings:
    roots: tuple[bytes, ...] = ()
    roots_file = mfa["webauthn"]["attestation_roots_file"]
    if roots_file:
        text = Path(roots_file).read_bytes()
        end = b"-----END CERTIFICATE-----"
        roots = tuple(part.strip() + b"\n" + end + b"\n" for part in text.split(end)
                      if b"-----BEGIN CERTIFICATE-----" in part)
    return MfaSettings.from_config(mfa, parse_duration, roots)


def _configure_mfa(manager: MfaManager, engine: SecurityManager,
                   security: dict[str, Any]) -> None:
    """(Re)applies security.mfa: settings, senders (an unchanged SMS provider keeps its
    circuit breaker), and the engine's second-factor question."""
    mfa = security["mfa"]
    senders: dict[str, Sender] = {}
    email = mfa["email"]
    if email["enabled"]:
        senders["email"] = EmailSender(SmtpRelay(
            host=email["smtp_host"], port=email["smtp_port"], tls=email["tls"],
            username=email["username"], password=read_secret(email, "password"),
            ca_file=email["ca_file"], from_address=email["from_address"],
            subject=email["subject"], body=email["body_template"],
            timeout=parse_duration(email["timeout"])))
    sms = mfa["sms"]
    if sms["enabled"]:
        provider = SmsProvider(
            url=sms["url"], auth_header=sms["auth_header"],
            auth_value=read_secret(sms, "auth_value"), content_type=sms["content_type"],
            body_template=sms["body_template"], message_template=sms["message_template"],
            timeout=parse_duration(sms["timeout"]), retries=sms["retries"],
            retry_backoff=parse_duration(sms["retry_backoff"]),
            failure_threshold=sms["failure_threshold"],
            reset_timeout=parse_duration(sms["reset_timeout"]))
        old = manager.senders.get("sms")
        senders["sms"] = old if isinstance(old, SmsSender) and old.provider == provider else (
            SmsSender(provider))
    settings = _mfa_settings(mfa)
    manager.configure(settings, senders)
    manager.ipv6_prefix_length = security["ipv6_prefix_length"]
    engine.second_factor = manager
    engine.mfa_message = settings.policy.message
