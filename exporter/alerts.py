"""The threshold alert engine: the generated rules' threshold alerts, evaluated in process.

A host without Prometheus still gets alerts. Every `alerting.engine.
evaluation_interval` the engine reads the exporter's own metrics as a scrape of
/metrics would (its own collector instances, so it never shortens the CPU interval
Prometheus sees), gives them the target labels, and evaluates every enabled
threshold row of exporter/generate/alerts.py (`THRESHOLD_ALERTS`) exactly as
Prometheus evaluates the generated rule (exporter/rule_values.py), with the rule's
own labels, annotations, `for` and `keep_firing_for` (`rule_for()`, the function
that writes alert-rules/alerts.yaml). Alert states follow Prometheus 2.42's rule
manager step for step: pending from the first evaluation the condition holds,
firing once it has held for `for`, kept firing after it stops holding until it has
been false at every evaluation for `keep_firing_for` (the hysteresis), then
resolved and kept 15 minutes so Alertmanager hears it. So the engine and a
Prometheus loading the generated rules fire and resolve at the same evaluation
(tests/integration/test_alert_agreement.py feeds both the same series).

Active alerts are exported as a3mailer_alert_active / _pending {alert, severity}
and served at GET /api/v1/alerts; with alertmanager.url they are pushed to
Alertmanager's API v2 as Prometheus pushes them (exporter/alert_push.py). States
are saved in the state directory (alerts.json), with the rate rules' counter samples,
when they change, every STATE_REFRESH_S and at stop, and restored at start, unless the
exporter was down longer than an hour (Prometheus's for-outage-tolerance), so a restart
neither re-waits `for` nor re-notifies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.alert_push import AlertPusher, PushSettings
from exporter.alert_templates import expand
from exporter.config import Config, parse_duration
from exporter.generate.alerts import THRESHOLD_ALERTS, Alert, rule_for
from exporter.generate.values import lookup
from exporter.rule_values import CounterHistory, Samples, compare, row_values, windows
from exporter.schedule import Periodic

log = logging.getLogger(__name__)

RESOLVED_RETENTION_MS = 15 * 60 * 1000  # Prometheus's resolvedRetention
OUTAGE_TOLERANCE_S = 3600.0  # Prometheus's --rules.alert.for-outage-tolerance
STATE_FILE = "alerts.json"
STATE_VERSION = 1
# the state file is rewritten at least this often while the engine runs (and at stop), so
# the outage tolerance counts from about when the exporter went down, not from the last
# change of state
STATE_REFRESH_S = 300.0
# an evaluation's bound, whatever the interval (runs never overlap: the next waits for it)
EVALUATION_TIMEOUT_S = 10.0
PENDING, FIRING, INACTIVE = "pending", "firing", "inactive"
TIME_FIELDS = ("active_at", "fired_at", "resolved_at", "keep_firing_since", "valid_until")


@dataclass(frozen=True)
class Rule:
    """One enabled threshold alert as configured: its row and its rendered rule."""

    alert: Alert
    threshold: float
    for_ms: int
    keep_firing_for_ms: int
    labels: dict[str, str]  # templates, severity included
    annotations: dict[str, str]  # templates, thresholds and `for` filled in

    @property
    def name(self) -> str:
        return self.alert.name

    @property
    def severity(self) -> str:
        return self.labels["severity"]

    @property
    def key(self) -> str:
        """Identity across reloads (as Prometheus's copyState: name and labels)."""
        return json.dumps([self.name, self.labels], sort_keys=True)


@dataclass
class ActiveAlert:
    """An alert instance, with Prometheus's Alert fields (times in ms)."""

    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    state: str
    active_at: int
    fired_at: int = 0
    resolved_at: int = 0
    keep_firing_since: int = 0
    last_sent_at: int | None = None  # never sent
    valid_until: int = 0


@dataclass
class EngineSettings:
    enabled: bool = True
    interval: float = 30.0
    target_labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> EngineSettings:
        engine = config["alerting"]["engine"]
        labels = dict(engine["target_labels"])
        if "instance" not in labels:
            from exporter.cli import split_listen

            port = split_listen(config["server"]["listen_address"])[1]
            labels["instance"] = f"{socket.gethostname()}:{port}"
        return cls(engine["enabled"], parse_duration(engine["evaluation_interval"]), labels)


def build_rules(config: Config) -> list[Rule]:
    """The enabled threshold alerts, as the generated rules configure them."""
    rules = []
    for alert in THRESHOLD_ALERTS:
        rendered = rule_for(config, alert)
        if rendered is None:
            continue
        rules.append(Rule(alert, float(lookup(config, alert.threshold)),
                          _ms(rendered.get("for", "0s")),
                          _ms(rendered.get("keep_firing_for", "0s")),
                          dict(rendered["labels"]), dict(rendered["annotations"])))
    return rules


def _ms(duration: str) -> int:
    return round(parse_duration(duration) * 1000)  # a zero (0s, 0m) is 0


def fingerprint(labels: dict[str, str]) -> str:
    return json.dumps(sorted(labels.items()))


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class AlertEngine:
    def __init__(self, state_dir: Path | None = None,
                 clock: Callable[[], float] = time.time):
        self.state_path = state_dir / STATE_FILE if state_dir is not None else None
        self.clock = clock
        self.settings = EngineSettings()
        self.rules: list[Rule] = []
        self.collect_source: Callable[[], Iterable[Metric]] = lambda: ()
        self.history = CounterHistory()
        self.active: dict[str, dict[str, ActiveAlert]] = {}  # rule key -> fingerprint -> alert
        self.pusher = AlertPusher()
        self.last_evaluation = 0.0
        self.periodic = Periodic("alerts", self.evaluate_once, 30.0, 30.0)
        self._rate_names: dict[str, float] = {}
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}
        self._saved = ""
        self._saved_at = 0.0
        self._restored = False
        # restored alerts the first evaluation after start leaves as they are when it has
        # no result for them: a rate has no two samples yet, the first CPU reading is the
        # share since boot (Prometheus's own TSDB spans its restarts; this history does not)
        self._held: set[tuple[str, str]] = set()
        self._failing = False  # an evaluation failed: logged once, and once when it recovers

    # --- configuration

    def configure(self, config: Config, source: Callable[[], Iterable[Metric]]) -> None:
        """(Re)applies the config; alerts of rules that stay the same keep their state."""
        self.settings = EngineSettings.from_config(config)
        self.collect_source = source
        self.periodic.interval = self.settings.interval
        self.periodic.timeout = max(self.settings.interval, EVALUATION_TIMEOUT_S)
        old = self.active
        self.rules = build_rules(config) if self.settings.enabled else []
        self.active = {rule.key: old.get(rule.key, {}) for rule in self.rules}
        self.pusher.configure(PushSettings.from_config(config["alerting"]["engine"][
            "alertmanager"]))
        self._resolve_dropped(old)
        self._rate_names = {}
        for rule in self.rules:
            for name, window in windows(rule.alert).items():
                self._rate_names[name] = max(window, self._rate_names.get(name, 0.0))
        if not self._restored:
            self._restored = True
            self._restore()

    def _resolve_dropped(self, old: dict[str, dict[str, ActiveAlert]]) -> None:
        """Alerts of rules the reload removed (disabled, other severity or labels, engine
        off) that Alertmanager was told of get one resolved push now, not at their endsAt."""
        now = round(self.clock() * 1000)
        sends = {}
        for key, group in old.items():
            if key in self.active:
                continue
            for fp, alert in group.items():
                if alert.last_sent_at is None or (alert.resolved_at
                                                  and alert.resolved_at <= alert.last_sent_at):
                    continue  # never sent, or its resolution was sent already
                sends[fp] = {"labels": dict(alert.labels),
                             "annotations": dict(alert.annotations),
                             "startsAt": rfc3339(alert.fired_at),
                             "endsAt": rfc3339(alert.resolved_at or now)}
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a test's configure): nothing was ever sent
            return
        self.pusher.submit(sends)

    # --- evaluation

    async def evaluate_once(self) -> int:
        """One evaluation: read the metrics (in a worker thread, as /metrics does), evaluate,
        push. Returns the number of firing alerts. Runs every evaluation_interval (its
        Periodic), as the schedule `alerts`: timed, traced, failures counted."""
        if not self.settings.enabled:
            return 0
        try:
            families = await asyncio.to_thread(lambda: list(self.collect_source()))
        except Exception as exc:
            self._failed(f"reading the metrics raised {type(exc).__name__}: {exc}")
            raise
        errors: dict[str, str] = {}
        sends = self.evaluate(families, self.clock(), errors)
        if sends:
            self.pusher.submit(sends)
        self.save()
        if errors:
            message = "; ".join(f"{name}: {error}" for name, error in errors.items())
            self._failed(message)
            raise RuntimeError(message)
        if self._failing:
            self._failing = False
            log.info("alert evaluation recovered")
        return sum(a.state == FIRING for alerts in self.active.values()
                   for a in alerts.values())

    def _failed(self, error: str) -> None:
        """Logs a failing evaluation once per streak (Periodic counts every one)."""
        if not self._failing:
            self._failing = True
            log.warning("alert evaluation failing", extra={"error": error})

    def evaluate(self, families: Iterable[Metric], now: float,
                 errors: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """Evaluates every rule over one scrape at Unix time `now`; returns the alerts that
        need sending to Alertmanager (fingerprint -> API v2 alert). A rule that raises is
        put in `errors` (alert name -> error) and the other rules are evaluated."""
        t = round(now * 1000)
        samples = Samples(families, self.settings.target_labels)
        keep = round(max(self._rate_names.values(), default=0.0) * 1000)
        self.history.record(samples, self._rate_names, t, keep)
        sends: dict[str, dict[str, Any]] = {}
        counts: dict[tuple[str, str], tuple[int, int]] = {}
        for rule in self.rules:
            try:
                self._step(rule, samples, t)
                if self.pusher.enabled:
                    sends.update(self._to_send(rule, t))
            except Exception as exc:
                if errors is None:
                    raise
                errors[rule.name] = f"{type(exc).__name__}: {exc}"
            states = [a.state for a in self.active.get(rule.key, {}).values()]
            fired, waiting = counts.get((rule.name, rule.severity), (0, 0))
            counts[rule.name, rule.severity] = (fired + states.count(FIRING),
                                                waiting + states.count(PENDING))
        self._counts = counts  # one assignment: a scrape thread reads it whole
        self.last_evaluation = now
        self._held = set()
        return sends

    def _step(self, rule: Rule, samples: Samples, t: int) -> None:
        """Prometheus's AlertingRule.Eval for one rule at t (ms)."""
        results: dict[str, ActiveAlert] = {}
        for series, value in row_values(rule.alert, samples, self.history, t):
            if not compare(rule.alert.op, value, rule.threshold):
                continue
            labels = {**series}
            for name, template in rule.labels.items():
                labels[name] = expand(template, series, value)
            labels["alertname"] = rule.name
            labels = {k: v for k, v in labels.items() if v != ""}  # as Prometheus drops them
            annotations = {name: expand(template, series, value)
                           for name, template in rule.annotations.items()}
            key = fingerprint(labels)
            if key in results:  # Prometheus fails the rule's evaluation: nothing changes
                log.warning("two series give the same alert labels; rule not evaluated",
                            extra={"alert": rule.name})
                return
            results[key] = ActiveAlert(labels, annotations, value, PENDING, t)
        active = self.active.setdefault(rule.key, {})
        for key, fresh in results.items():
            current = active.get(key)
            if current is not None and current.state != INACTIVE:
                current.value, current.annotations = fresh.value, fresh.annotations
            else:
                active[key] = fresh
        seen = results.keys()
        held = self._held
        for key, alert in list(active.items()):
            if key not in seen:
                if held and (rule.key, key) in held:
                    continue
                keep_firing = False
                if alert.state == FIRING and rule.keep_firing_for_ms > 0:
                    if not alert.keep_firing_since:
                        alert.keep_firing_since = t
                    keep_firing = t - alert.keep_firing_since < rule.keep_firing_for_ms
                if alert.state == PENDING or (
                        alert.resolved_at and t - alert.resolved_at > RESOLVED_RETENTION_MS):
                    del active[key]
                if alert.state != INACTIVE and not keep_firing:
                    alert.state, alert.resolved_at = INACTIVE, t
                if not keep_firing:
                    continue
            else:
                alert.keep_firing_since = 0
            if alert.state == PENDING and t - alert.active_at >= rule.for_ms:
                alert.state, alert.fired_at = FIRING, t

    def _to_send(self, rule: Rule, t: int) -> dict[str, dict[str, Any]]:
        """Prometheus's sendAlerts: firing alerts every resend interval, resolved ones at once
        and then every resend interval while they are kept."""
        resend = round(self.pusher.settings.resend_interval * 1000)
        sends = {}
        for key, alert in self.active.get(rule.key, {}).items():
            if alert.state == PENDING:
                continue
            last = alert.last_sent_at
            if last is not None and not (alert.resolved_at > last or last + resend < t):
                continue
            alert.last_sent_at = t
            alert.valid_until = t + 4 * max(resend, round(self.settings.interval * 1000))
            ends = alert.resolved_at or alert.valid_until
            sends[key] = {"labels": dict(alert.labels), "annotations": dict(alert.annotations),
                          "startsAt": rfc3339(alert.fired_at), "endsAt": rfc3339(ends)}
        return sends

    # --- what the HTTP API and /metrics show

    def snapshot(self, state: str | None = None) -> list[dict[str, Any]]:
        """Pending and firing alerts, for GET /api/v1/alerts."""
        out = []
        for rule in self.rules:
            for alert in self.active.get(rule.key, {}).values():
                if alert.state == INACTIVE or (state is not None and alert.state != state):
                    continue
                out.append({
                    "name": rule.name, "severity": alert.labels.get("severity", ""),
                    "state": alert.state, "value": _json_number(alert.value),
                    "threshold": rule.threshold,
                    "since": (alert.fired_at if alert.state == FIRING else alert.active_at) / 1000,
                    "active_at": alert.active_at / 1000,
                    "fired_at": alert.fired_at / 1000 if alert.fired_at else None,
                    "keep_firing_since": (alert.keep_firing_since / 1000
                                          if alert.keep_firing_since else None),
                    "for_seconds": rule.for_ms / 1000,
                    "keep_firing_for_seconds": rule.keep_firing_for_ms / 1000,
                    "labels": dict(alert.labels), "annotations": dict(alert.annotations)})
        return sorted(out, key=lambda a: (a["name"], a["severity"], sorted(a["labels"].items())))

    def status(self) -> dict[str, Any]:
        last = self.periodic.last
        return {"enabled": self.settings.enabled,
                "evaluation_interval_seconds": self.settings.interval,
                "last_evaluation": self.last_evaluation or None,
                "evaluations": last.runs, "evaluation_failures": last.failures,
                "last_error": last.error or None,
                "rules": len(self.rules),
                "alertmanager": {"enabled": self.pusher.enabled,
                                 "pushes": self.pusher.pushes,
                                 "failures": self.pusher.failed,
                                 "last_success": self.pusher.last_success or None,
                                 "last_error": self.pusher.last_error or None}}

    def collect(self) -> Iterator[Metric]:
        if not self.settings.enabled:
            return
        firing = catalogue.family("a3mailer_alert_active")
        pending = catalogue.family("a3mailer_alert_pending")
        # the counts of the last evaluation (this runs on a scrape's worker thread, while the
        # event loop may be evaluating); every configured alert at 0 before the first one
        last = self._counts
        counts = {key: last.get(key, (0, 0)) for key in {(r.name, r.severity) for r in self.rules}}
        for (name, severity), (fired, waiting) in sorted(counts.items()):
            firing.add_metric([name, severity], float(fired))
            pending.add_metric([name, severity], float(waiting))
        yield firing
        yield pending
        outcome = self.periodic.last
        yield catalogue.single("a3mailer_alert_evaluations_total", float(outcome.runs))
        yield catalogue.single("a3mailer_alert_evaluation_failures_total",
                               float(outcome.failures))
        yield catalogue.single("a3mailer_alert_evaluation_duration_seconds", outcome.duration)
        if self.pusher.enabled:
            yield from self.pusher.collect()

    # --- running

    async def start(self) -> None:
        self.periodic.start()

    async def stop(self) -> None:
        await self.periodic.stop()
        self.save(force=True)
        await self.pusher.stop()

    # --- state across restarts

    def save(self, force: bool = False) -> None:
        """Writes the alert states (temp file + rename) when they changed, when the last
        write is STATE_REFRESH_S old, or when forced (at stop)."""
        if self.state_path is None:
            return
        alerts = [{"rule": key, **asdict(alert)} for key, group in self.active.items()
                  for alert in group.values()]
        states = json.dumps([{k: v for k, v in a.items() if k not in ("value", "annotations")}
                             for a in alerts], sort_keys=True)
        now = self.clock()
        if states == self._saved and not force and now - self._saved_at < STATE_REFRESH_S:
            return
        # with the counter samples of the rate rules: rates go on across the restart
        data = {"version": STATE_VERSION, "saved_at": now, "alerts": alerts,
                "history": self.history.dump()}
        try:
            tmp = self.state_path.with_name(self.state_path.name + ".tmp")
            tmp.write_text(json.dumps(data, allow_nan=True), encoding="utf-8")
            os.replace(tmp, self.state_path)
            self._saved, self._saved_at = states, now
        except OSError as exc:
            log.error("cannot save alert states", extra={"error": str(exc)})

    def _restore(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError("not a version 1 state file")
            if self.clock() - float(data["saved_at"]) > OUTAGE_TOLERANCE_S:
                log.info("alert states older than the outage tolerance; starting afresh")
                return
            restored: list[tuple[str, str, ActiveAlert]] = []
            for item in data["alerts"]:
                item = dict(item)
                key = item.pop("rule")
                alert = ActiveAlert(**item)
                if not isinstance(key, str):
                    raise ValueError("an alert without its rule")
                _check_alert(alert)
                restored.append((key, fingerprint(alert.labels), alert))
            history = CounterHistory()
            history.load(data.get("history") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("cannot read saved alert states; starting afresh",
                      extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        # applied only once the whole file has been read: a bad entry restores nothing
        self.history = history
        for key, fp, alert in restored:
            if key in self.active:
                self.active[key][fp] = alert
                self._held.add((key, fp))
        log.info("alert states restored", extra={"alerts": len(self._held)})


def _check_alert(alert: ActiveAlert) -> None:
    """Raises ValueError unless every field of a restored alert has its type: a wrong one
    would fail every evaluation after the restore."""
    for name in ("labels", "annotations"):
        pairs = getattr(alert, name)
        if not isinstance(pairs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in pairs.items()):
            raise ValueError(f"an alert's {name} are not a mapping of strings")
    if alert.state not in (PENDING, FIRING, INACTIVE):
        raise ValueError(f"an alert's state is {alert.state!r}")
    if not _is_number(alert.value):
        raise ValueError("an alert's value is not a number")
    for name in TIME_FIELDS + ("last_sent_at",):
        value = getattr(alert, name)
        if value is None and name == "last_sent_at":
            continue
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"an alert's {name} is not a time: {value!r}")
        setattr(alert, name, round(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_number(value: float) -> float | str:
    """JSON has no NaN or infinities: those go as strings, as Prometheus's API writes them."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return value
