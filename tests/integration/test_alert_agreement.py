"""The in-process alert engine and Prometheus agree, evaluation step by evaluation step.

One synthetic timeline of series is built from the threshold rows themselves: each
row's metric is on the good side of its threshold, breaches it for longer than the
alert's `for`, comes back for less than keep_firing_for (the hysteresis keeps the
alert firing), breaches again and comes back for good; a filesystem disappears while
its alert fires; series that fail a row's label matchers breach all along. The same
timeline goes to the engine, through a fake scrape with a fake clock, and to
`promtool test rules` as input_series with the generated rule files. The engine's
firing alerts at every step, with their labels and every annotation, become the
promtool test's expectations, so promtool fails on any step where Prometheus
fires, resolves, labels or describes differently.
"""

from __future__ import annotations

import math
import re
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client.core import Metric

from exporter import catalogue
from exporter.alerts import FIRING, AlertEngine
from exporter.config import load_config, parse_duration
from exporter.generate import alerts as tables
from exporter.generate.yaml_dump import dump_yaml
from exporter.rule_values import parse_matchers
from tests.integration.components import require_binary

STEP = 60  # seconds: the scrape and evaluation interval of both
KEEP_FIRING = 3  # steps of alerting.keep_firing_for
TARGET = {"job": "a3mailer-exporter", "instance": "mail1:10587"}
OVERRIDES = {
    "server": {"listen_address": "127.0.0.1:10587"},
    "alerting": {
        "keep_firing_for": f"{KEEP_FIRING}m",
        "labels": {"team": "mail"},
        "engine": {"evaluation_interval": f"{STEP}s", "target_labels": TARGET},
        "alerts": {
            # the overrides reach both: a shorter for, another severity and a label
            "A3MailerTlsCertificateExpiring": {"for": "20m"},
            # an empty label is dropped, as Prometheus drops it; for: 0s fires at once
            "A3MailerHighCpuUsage": {"severity": "critical",
                                     "labels": {"page": "yes", "empty": ""}},
            "A3MailerMailQueueLarge": {"for": "0s"},
            "A3MailerBanSpike": {"keep_firing_for": "0s"},
            "A3MailerLockoutSpike": {"enabled": False},
        },
    },
}

Series = tuple[str, tuple[tuple[str, str], ...]]  # sample name, labels


def _steps(duration: str) -> int:
    return round(parse_duration(duration) / STEP)


def satisfying(op: str, value: str) -> str:
    if op == "=":
        return value
    if op == "!=":
        return f"not_{value}"
    if op == "=~":
        candidate = value.split("|")[0].replace(".", "0")
        assert re.fullmatch(value, candidate), value
        return candidate
    return "zzz"


def violating(op: str, value: str) -> str:
    return {"=": f"not_{value}", "!=": value, "=~": "zzz", "!~": value}[op]


class Timeline:
    """Values per series per step (None: no sample; math.nan: a staleness marker)."""

    def __init__(self, steps: int):
        self.steps = steps
        self.values: dict[Series, list[float | None]] = {}

    def put(self, name: str, labels: dict[str, str], values: list[float | None]) -> None:
        key = (name, tuple(sorted({**labels, **TARGET}.items())))
        assert key not in self.values, key
        self.values[key] = (values + [values[-1]] * self.steps)[: self.steps]

    def families(self, step: int) -> list[Metric]:
        family = Metric("synthetic", "test series", "untyped")
        for (name, labels), values in self.values.items():
            value = values[step]
            if value is not None and not math.isnan(value):
                scraped = {k: v for k, v in labels if k not in TARGET}  # the scrape adds these
                family.add_sample(name, scraped, value)
        return [family]

    def input_series(self) -> list[dict[str, str]]:
        out = []
        for (name, labels), values in self.values.items():
            selector = ", ".join(f'{k}="{v}"' for k, v in labels)
            tokens = ["_" if v is None else "stale" if math.isnan(v) else repr(float(v))
                      for v in values]
            out.append({"series": f"{name}{{{selector}}}", "values": " ".join(tokens)})
        return out


def breach_pattern(for_steps: int, lag: int) -> list[bool]:
    """Good, breach past `for`, a dip shorter than the hysteresis, breach, good for good."""
    return ([False] * 2 + [True] * (for_steps + 3 + lag) + [False] * (KEEP_FIRING - 1)
            + [True] * (3 + lag) + [False] * (KEEP_FIRING + 3 + lag))


def level(alert: tables.Alert, threshold: float, bad: bool) -> float:
    """A value in the threshold's unit on the bad or the good side."""
    high = threshold * 2 if threshold else 10.0
    low = threshold / 4
    breach_high = alert.op in (">", ">=")
    return (high if bad else low) if breach_high else (low if bad else high)


def add_row(timeline: Timeline, alert: tables.Alert, config: Any, steps: int) -> list[bool]:
    """The series of one threshold row; returns its bad/good pattern."""
    threshold = float(tables.lookup(config, alert.threshold))
    rule = tables.rule_for(config, alert)
    assert rule is not None
    lag = _steps(alert.rate) if alert.rate else 0
    pattern = breach_pattern(_steps(rule.get("for", "0s")), lag)
    pattern = (pattern + [False] * steps)[:steps]
    spec = catalogue.METRICS[alert.metric]
    matchers = parse_matchers(alert.matchers)
    by_label = {m.name: m for m in matchers}
    labels = {n: satisfying(by_label[n].op, by_label[n].value) if n in by_label else "a"
              for n in spec.labels}
    if alert.metric == "a3mailer_tls_cert_not_after_timestamp_seconds":
        labels["probe"] = f"probe-{alert.severity}"  # one certificate per level
    raw = [level(alert, threshold, bad) / (alert.scale if alert.scale > 1 else 1)
           for bad in pattern]
    if alert.quantile:
        bound = threshold / alert.scale  # seconds
        bounds = [repr(bound / 4), repr(bound), repr(bound * 4), "+Inf"]
        counts = {b: 0.0 for b in bounds}
        series: dict[str, list[float | None]] = {b: [] for b in bounds}
        for bad in pattern:  # 10 requests a step, all slow or all fast
            for b in bounds:
                counts[b] += 10 if (bad and b in bounds[2:]) or not bad else 0
                series[b].append(counts[b])
        for b in bounds:
            timeline.put(f"{alert.metric}_bucket", {**labels, "le": b}, series[b])
        return pattern
    if alert.ratio:
        failed = parse_matchers(alert.ratio)
        bad_labels = {**labels, **{m.name: satisfying(m.op, m.value) for m in failed}}
        good_labels = {**labels, **{m.name: violating(m.op, m.value) for m in failed}}
        failures, successes, f_series, s_series = 0.0, 0.0, [], []
        for share in raw:  # 100 operations a step, a `share` of them failing
            failures += share * 100
            successes += (1 - share) * 100
            f_series.append(failures)
            s_series.append(successes)
        timeline.put(alert.metric, bad_labels, f_series)
        timeline.put(alert.metric, good_labels, s_series)
        return pattern
    if alert.rate:  # a per-second rate scaled to per minute: the increment per step
        total, values = 0.0, []
        for value in raw:
            total += value * STEP
            values.append(total)
        timeline.put(alert.metric, labels, values)
    elif alert.until:
        days = [level(alert, threshold, bad) for bad in pattern]
        timeline.put(alert.metric, labels, [i * STEP + d * 86400 for i, d in enumerate(days)])
    elif alert.total:
        split = next(n for n in spec.labels if n not in by_label)
        timeline.put(alert.metric, {**labels, split: "x"}, [v * 0.6 for v in raw])
        timeline.put(alert.metric, {**labels, split: "y"}, [v * 0.4 for v in raw])
    else:
        timeline.put(alert.metric, labels, list(raw))
    if matchers and not alert.until:  # a sibling that fails the matchers breaches all along
        first = matchers[0]
        other = {**labels, first.name: violating(first.op, first.value)}
        bad = level(alert, threshold, True) / (alert.scale if alert.scale > 1 else 1)
        timeline.put(alert.metric, other, [bad * STEP * (i + 1) if alert.rate else bad
                                           for i in range(steps)])
    if alert.name == "A3MailerDiskSpaceLow":  # a filesystem unmounted while its alert fires
        gone = [raw[0]] * 2 + [raw[3]] * (_steps(rule["for"]) + 4) + [math.nan]
        timeline.put(alert.metric, {**labels, "mountpoint": "/mnt"},
                     gone + [None] * steps)
    return pattern


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("agreement")
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(OVERRIDES))
    config = load_config(path)
    rows = [a for a in tables.THRESHOLD_ALERTS if tables.rule_for(config, a) is not None]
    steps = 2 + max(len(breach_pattern(_steps(tables.rule_for(config, a).get("for", "0s")),
                                       _steps(a.rate) if a.rate else 0)) for a in rows)
    timeline = Timeline(steps)
    patterns = {}
    seen_metrics: set[str] = set()
    for alert in rows:
        if alert.metric in seen_metrics and alert.metric != (
                "a3mailer_tls_cert_not_after_timestamp_seconds"):
            continue
        seen_metrics.add(alert.metric)
        patterns[alert.name, alert.severity] = add_row(timeline, alert, config, steps)
    engine = AlertEngine(None)
    engine.configure(config, lambda: ())
    firing: list[list[dict[str, Any]]] = []
    for step in range(steps):
        engine.evaluate(timeline.families(step), step * STEP)
        firing.append([a for a in engine.snapshot() if a["state"] == FIRING])
    (work / "alerts.yaml").write_text(dump_yaml(tables.render_rules(config)))
    (work / "recording-rules.yaml").write_text(dump_yaml(tables.render_recording_rules(config)))
    names = sorted({a.name for a in rows})
    checks = []
    for step in range(steps):
        for name in names:
            checks.append({"eval_time": f"{step}m", "alertname": name, "exp_alerts": [
                {"exp_labels": {k: v for k, v in a["labels"].items() if k != "alertname"},
                 "exp_annotations": a["annotations"]}
                for a in firing[step] if a["name"] == name]})
    test = {"rule_files": ["alerts.yaml", "recording-rules.yaml"],
            "evaluation_interval": f"{STEP}s",
            "group_eval_order": ["a3mailer-recording",
                                 *(f"a3mailer-{f}" for f in tables.FAMILIES)],
            "tests": [{"name": "engine timeline", "interval": f"{STEP}s",
                       "input_series": timeline.input_series(), "alert_rule_test": checks}]}
    (work / "agreement.test.yaml").write_text(dump_yaml(test))
    return {"work": work, "firing": firing, "patterns": patterns, "names": names,
            "config": config, "steps": steps}


def test_promtool_agrees_with_the_engine_at_every_step(run):
    result = subprocess.run([require_binary("promtool"), "test", "rules",
                             str(run["work"] / "agreement.test.yaml")],
                            capture_output=True, text=True, timeout=300, cwd=run["work"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-20000:]
    assert "SUCCESS" in result.stdout


def _firing_steps(run: dict[str, Any], name: str, **labels: str) -> list[int]:
    return [step for step, alerts in enumerate(run["firing"])
            if any(a["name"] == name and all(a["labels"].get(k) == v for k, v in labels.items())
                   for a in alerts)]


def test_every_row_fires_and_resolves_in_the_timeline(run):
    """The expectations are not vacuous: every enabled threshold alert fires and resolves."""
    for name in run["names"]:
        steps = _firing_steps(run, name)
        assert steps, f"{name} never fired"
        assert steps[-1] < run["steps"] - 1, f"{name} never resolved"
    assert "A3MailerLockoutSpike" not in run["names"]  # disabled by its override


def test_for_and_hysteresis_steps_are_the_documented_ones(run):
    """CPU: 10m for, breach from step 2; back at step 15 for 2 steps (< 3m): still firing;
    breach again; back for good at step 20: resolved at 20 + 3 = step 23."""
    pattern = run["patterns"]["A3MailerHighCpuUsage", "warning"]
    assert pattern[:2] == [False, False] and pattern[2:15] == [True] * 13
    assert _firing_steps(run, "A3MailerHighCpuUsage") == list(range(12, 23))
    cpu = next(a for a in run["firing"][12] if a["name"] == "A3MailerHighCpuUsage")
    assert cpu["labels"] == {"alertname": "A3MailerHighCpuUsage", "severity": "critical",
                             "page": "yes", "team": "mail", **TARGET}
    assert cpu["annotations"]["description"] == (
        "CPU usage on mail1:10587 has been 160.0% for 10m, above the threshold of 80%.")
    # for: 0s (written as such in the rule): the queue alert fires at its first bad step
    [queue] = [p for (name, _), p in run["patterns"].items() if name == "A3MailerMailQueueLarge"]
    assert _firing_steps(run, "A3MailerMailQueueLarge")[0] == queue.index(True) == 2
    # keep_firing_for 0s: the ban spike (5m for, breach from step 2) resolves at the first
    # step back (10), and the second breach (3 steps) is shorter than its for
    assert _firing_steps(run, "A3MailerBanSpike") == [7, 8, 9]
    # the filesystem unmounted at step 11 while its alert fires: kept 3 steps, resolved at 14
    assert _firing_steps(run, "A3MailerDiskSpaceLow", mountpoint="/mnt") == list(range(7, 14))
