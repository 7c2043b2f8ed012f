"""The Prometheus alerting and recording rules, as data.

`ALERTS` is the one table of alerts. A row is either

- a threshold alert (`metric` set): one catalogued metric, optionally summed or
  rated per instance (`rate`), turned into a ratio of its rates (`ratio`: the share
  of the rate with those matchers) or a histogram quantile (`quantile`), scaled
  into the unit of its threshold and compared with the value at the config key path
  `threshold`. These rows are everything the in-process engine (exporter/alerts.py)
  needs (metric, matchers, rate window, scale, comparison, threshold key, `for`,
  severity), so it fires and resolves with Prometheus; `THRESHOLD_ALERTS` lists
  them; or
- an expression alert (`expr` set), written with the tokens of `promql.py`.

`render_rules(config, value)` turns the tables into rule groups: the loaded
config supplies selector, per-alert overrides, labels and URL patterns; `value`
writes each threshold (the configured number, or a Helm template for the chart).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from exporter import catalogue
from exporter.config import Config, parse_duration
from exporter.generate import dashboards, promql
from exporter.generate.values import ValueRenderer, configured, lookup, number

T = "monitoring.alert_thresholds."
FAMILIES = ("system", "application", "mail", "security", "exporter")
SEVERITIES = ("critical", "warning", "info")
COMPARISONS = (">", "<", ">=", "<=")


@dataclass(frozen=True)
class Alert:
    name: str
    family: str  # rule group and runbook page
    severity: str
    for_: str
    summary: str
    description: str  # Go template; <<threshold>> is the rendered threshold
    dashboard: str  # key of the dashboard that shows it
    expr: str = ""  # expression alerts
    # threshold alerts
    metric: str = ""
    matchers: str = ""  # extra label matchers, e.g. result="failure"
    rate: str = ""  # window: per-second rate, summed per instance
    ratio: str = ""  # matchers: the share of the rate that has them (0 when none has)
    quantile: float = 0  # a histogram: this quantile of its buckets' rates
    record: str = ""  # recording rule holding that rate, ratio or quantile
    total: bool = False  # sum the series per instance first (gauges with a split label)
    until: bool = False  # compare metric - time() (a Unix timestamp ahead)
    scale: float = 1  # the metric's value times scale is in the threshold's unit
    op: str = ">"
    threshold: str = ""  # config key path

    @property
    def is_threshold(self) -> bool:
        return bool(self.metric)


@dataclass(frozen=True)
class Recording:
    record: str  # level:metric:operations
    expr: str
    labels: tuple[tuple[str, str], ...] = ()


def _rate(metric: str, matchers: str, window: str) -> str:
    inner = f"<<sel>>, {matchers}" if matchers else "<<sel>>"
    return f"sum by (<<by>>) (rate({metric}{{{inner}}}[{window}]))"


def _ratio(metric: str, failed: str, window: str) -> str:
    """Share of a counter's rate with the `failed` matchers; 0 (not absent) when none."""
    total = _rate(metric, "", window)
    return f"(\n  {_rate(metric, failed, window)}\n  or\n  {total} * 0\n)\n/\n{total}"


def _quantile(metric: str, q: float, window: str) -> str:
    return (f"histogram_quantile({number(q)}, sum by (<<by>>, le) "
            f"(rate({metric}_bucket{{<<sel>>}}[{window}])))")


# --- recording rules: expressions that alerts and dashboards share or that are costly
# (the threshold alerts' rates, ratios and quantiles come from their rows: threshold_recordings)
RECORDING_RULES: list[Recording] = [
    Recording("instance_protocol:a3mailer_stalwart_request_time_seconds:mean5m",
              "\nor\n".join(
                  f'label_replace(sum by (<<by>>) (rate(a3mailer_stalwart_{p}_request_time_seconds'
                  f"_sum{{<<sel>>}}[5m]))\n  / sum by (<<by>>) (rate(a3mailer_stalwart_{p}_request_"
                  f'time_seconds_count{{<<sel>>}}[5m])), "protocol", "{p}", "", "")'
                  for p in ("smtp", "imap", "pop3", "http"))),
]

_ON = "{{ $labels.instance }}"

ALERTS: list[Alert] = [
    # --- system
    Alert("A3MailerHighCpuUsage", "system", "warning", "10m",
          f"CPU usage is high on {_ON}.",
          f"CPU usage on {_ON} has been {{{{ $value | printf \"%.1f\" }}}}% for <<for>>, "
          "above the threshold of <<threshold>>%.",
          "system", metric="a3mailer_system_cpu_usage_ratio", scale=100,
          threshold=T + "cpu_usage_threshold"),
    Alert("A3MailerHighMemoryUsage", "system", "warning", "10m",
          f"Memory usage is high on {_ON}.",
          f"Memory usage on {_ON} is {{{{ $value | printf \"%.1f\" }}}}%, above the threshold "
          "of <<threshold>>% (available memory counted as free).",
          "system", metric="a3mailer_system_memory_usage_ratio", scale=100,
          threshold=T + "memory_usage_threshold"),
    Alert("A3MailerDiskSpaceLow", "system", "warning", "5m",
          f"Filesystem {{{{ $labels.mountpoint }}}} on {_ON} is almost full.",
          f"Filesystem {{{{ $labels.mountpoint }}}} on {_ON} is "
          "{{ $value | printf \"%.1f\" }}% full, above the threshold of <<threshold>>%.",
          "system", metric="a3mailer_system_disk_usage_ratio", scale=100,
          threshold=T + "disk_usage_threshold"),
    Alert("A3MailerDiskWillFillSoon", "system", "warning", "1h",
          f"Filesystem {{{{ $labels.mountpoint }}}} on {_ON} will be full within <<threshold>> "
          "hours.",
          f"At the rate of the last 6 hours, filesystem {{{{ $labels.mountpoint }}}} on {_ON} "
          "runs out of space within <<threshold>> hours.",
          "system",
          expr="predict_linear(a3mailer_system_disk_free_bytes{<<sel>>}[6h], <<threshold>> * 3600)"
               " < 0",
          threshold=T + "disk_full_prediction_hours"),
    # --- application
    Alert("A3MailerTooManyConnections", "application", "warning", "10m",
          f"Too many established TCP connections on {_ON}.",
          f"{_ON} has {{{{ $value }}}} established TCP connections, above the threshold of "
          "<<threshold>>.",
          "system", metric="a3mailer_system_tcp_connections", matchers='state="established"',
          threshold=T + "connection_count_threshold"),
    Alert("A3MailerApiErrorRateHigh", "application", "warning", "10m",
          f"The exporter's HTTP API on {_ON} answers with server errors.",
          f"{{{{ $value | printf \"%.1f\" }}}}% of the HTTP requests to {_ON} (security "
          "decisions, webhooks, admin API) failed with 5xx in the last 5 minutes, above the "
          "threshold of <<threshold>>%.",
          "performance", metric="a3mailer_exporter_http_requests_total", ratio='code=~"5.."',
          rate="5m", record="instance:a3mailer_exporter_http_errors:ratio_rate5m", scale=100,
          threshold=T + "error_rate_threshold"),
    Alert("A3MailerApiSlowResponses", "application", "warning", "10m",
          f"The exporter's HTTP API on {_ON} is slow.",
          f"The 95th percentile of HTTP response times on {_ON} is "
          "{{ $value | printf \"%.0f\" }} ms, above the threshold of <<threshold>> ms.",
          "performance", metric="a3mailer_exporter_http_request_duration_seconds",
          quantile=0.95, rate="5m",
          record="instance_quantile:a3mailer_exporter_http_request_duration_seconds:"
                 "histogram_quantile", scale=1000, threshold=T + "response_time_threshold"),
    Alert("A3MailerStalwartSlowRequests", "application", "warning", "10m",
          f"A3Mailer/Stalwart {{{{ $labels.protocol }}}} requests are slow on {_ON}.",
          f"Stalwart's {{{{ $labels.protocol }}}} requests on {_ON} took "
          "{{ $value | printf \"%.0f\" }} ms on average over 5 minutes, above the threshold of "
          "<<threshold>> ms.",
          "performance",
          expr="instance_protocol:a3mailer_stalwart_request_time_seconds:mean5m * 1000 > "
               "<<threshold>>",
          threshold=T + "response_time_threshold"),
    Alert("A3MailerMailQueueLarge", "application", "warning", "15m",
          f"The mail queue on {_ON} is large.",
          f"{{{{ $value }}}} messages are queued on {_ON}, above the threshold of <<threshold>>.",
          "mail", metric="a3mailer_queue_total_messages", threshold=T + "queue_size_threshold"),
    # --- mail
    Alert("A3MailerProbeFailing", "mail", "critical", "2m",
          "Mail service probe {{ $labels.probe }} ({{ $labels.protocol }}) is failing.",
          f"The {{{{ $labels.protocol }}}} probe {{{{ $labels.probe }}}} run by {_ON} has failed "
          "for <<for>>; the reason is in the exporter's /health.",
          "mail", expr="a3mailer_probe_success{<<sel>>} == 0"),
    Alert("A3MailerProbeSlow", "mail", "warning", "10m",
          "Mail service probe {{ $labels.probe }} ({{ $labels.protocol }}) is slow.",
          f"The {{{{ $labels.protocol }}}} probe {{{{ $labels.probe }}}} run by {_ON} took "
          "{{ $value | printf \"%.0f\" }} ms, above the threshold of <<threshold>> ms.",
          "mail", metric="a3mailer_probe_duration_seconds", matchers='phase="total"', scale=1000,
          threshold=T + "response_time_threshold"),
    Alert("A3MailerTlsCertificateNotVerified", "mail", "warning", "10m",
          "The certificate of {{ $labels.probe }} does not verify.",
          f"The certificate presented to probe {{{{ $labels.probe }}}} on {_ON} failed chain or "
          "name verification; clients that verify will refuse it.",
          "mail", expr="a3mailer_probe_tls_verified{<<sel>>} == 0"),
    Alert("A3MailerTlsCertificateExpiring", "mail", "warning", "1h",
          "The certificate of {{ $labels.probe }} expires in {{ $value | printf \"%.0f\" }} days.",
          f"The certificate presented to probe {{{{ $labels.probe }}}} on {_ON} expires in "
          "{{ $value | printf \"%.1f\" }} days, less than <<threshold>> days; renew it.",
          "mail", metric="a3mailer_tls_cert_not_after_timestamp_seconds", until=True,
          scale=1 / 86400, op="<", threshold=T + "cert_expiry_warning_days"),
    Alert("A3MailerTlsCertificateExpiring", "mail", "critical", "1h",
          "The certificate of {{ $labels.probe }} expires in {{ $value | printf \"%.0f\" }} days.",
          f"The certificate presented to probe {{{{ $labels.probe }}}} on {_ON} expires in "
          "{{ $value | printf \"%.1f\" }} days, less than <<threshold>> days; renew it now.",
          "mail", metric="a3mailer_tls_cert_not_after_timestamp_seconds", until=True,
          scale=1 / 86400, op="<", threshold=T + "cert_expiry_critical_days"),
    Alert("A3MailerDeliveryRoundTripFailing", "mail", "critical", "10m",
          f"Test messages sent by {_ON} do not arrive.",
          f"The delivery round trip of {_ON} (submission, then IMAP) has not received its test "
          "message within monitoring.delivery.timeout for <<for>>.",
          "mail", expr="a3mailer_delivery_roundtrip_success{<<sel>>} == 0"),
    Alert("A3MailerDeliveryRoundTripSlow", "mail", "warning", "15m",
          f"Mail delivery is slow on {_ON}.",
          f"The last test message of {_ON} took {{{{ $value | printf \"%.1f\" }}}} s from "
          "submission to the IMAP mailbox, above the threshold of <<threshold>> s.",
          "mail", metric="a3mailer_delivery_roundtrip_last_seconds",
          threshold=T + "delivery_roundtrip_threshold"),
    Alert("A3MailerDeliveryErrorRateHigh", "mail", "warning", "15m",
          f"Many deliveries fail on {_ON}.",
          f"{{{{ $value | printf \"%.1f\" }}}}% of the delivery attempts logged on {_ON} in the "
          "last 5 minutes were deferred, bounced or expired, above the threshold of "
          "<<threshold>>%.",
          "mail", metric="a3mailer_mail_deliveries_total",
          ratio='status=~"deferred|bounced|expired"', rate="5m",
          record="instance:a3mailer_mail_deliveries_failed:ratio_rate5m", scale=100,
          threshold=T + "error_rate_threshold"),
    Alert("A3MailerDnsCheckFailing", "mail", "warning", "30m",
          "The {{ $labels.check }} DNS check of {{ $labels.domain }} fails.",
          f"The {{{{ $labels.check }}}} record of {{{{ $labels.domain }}}}, checked by {_ON}, is "
          "missing or broken; the reason is in the exporter's /health (component dns).",
          "mail", expr="a3mailer_dns_check_success{<<sel>>} == 0"),
    Alert("A3MailerDkimRecordBroken", "mail", "warning", "30m",
          "The DKIM key {{ $labels.selector }} of {{ $labels.domain }} is not usable.",
          "The DKIM record {{ $labels.selector }}._domainkey.{{ $labels.domain }}, checked "
          f"by {_ON}, is missing, revoked or invalid, so signed mail fails DKIM.",
          "mail", expr="a3mailer_dns_dkim_success{<<sel>>} == 0"),
    Alert("A3MailerDmarcNotEnforced", "mail", "info", "1h",
          "The DMARC policy of {{ $labels.domain }} is p=none.",
          "{{ $labels.domain }} publishes DMARC p=none: receivers report but do not reject "
          "spoofed mail. Move to quarantine or reject once reports are clean.",
          "mail", expr='a3mailer_dns_dmarc_policy{<<sel>>, policy="none"} == 1'),
    Alert("A3MailerListedOnDnsbl", "mail", "critical", "5m",
          "Sending IPs {{ $labels.ip_set }} are listed on {{ $labels.zone }}.",
          "At least one IP of the set {{ $labels.ip_set }} is listed by the DNSBL "
          f"{{{{ $labels.zone }}}} (checked by {_ON}); receivers using it will refuse the mail.",
          "mail", expr="a3mailer_dnsbl_listed{<<sel>>} == 1"),
    Alert("A3MailerDnsblCheckFailing", "mail", "info", "1h",
          "DNSBL {{ $labels.zone }} gives no definite answer.",
          f"Queries from {_ON} for {{{{ $labels.ip_set }}}} against {{{{ $labels.zone }}}} time "
          "out or are refused (a public resolver, or the zone needs registration).",
          "mail", expr="a3mailer_dnsbl_check_success{<<sel>>} == 0"),
    Alert("A3MailerQueueCheckFailing", "mail", "warning", "10m",
          "The {{ $labels.source }} queue cannot be read.",
          f"{_ON} has failed to read the {{{{ $labels.source }}}} mail queue for <<for>>; "
          "queue sizes are unknown. The reason is in /health (component queues).",
          "mail", expr="a3mailer_queue_check_success{<<sel>>} == 0"),
    Alert("A3MailerStalwartDown", "mail", "critical", "5m",
          f"A3Mailer/Stalwart cannot be reached from {_ON}.",
          f"{_ON} has failed to read Stalwart's /metrics/prometheus for <<for>>.",
          "mail", expr="a3mailer_stalwart_up{<<sel>>} == 0"),
    Alert("A3MailerStalwartNotReady", "mail", "critical", "5m",
          f"A3Mailer/Stalwart is not ready ({_ON}).",
          f"Stalwart's /healthz/ready, checked by {_ON}, has not answered 200 for <<for>> "
          "(503: its data store is not available).",
          "mail",
          expr='a3mailer_health_status{<<sel>>, component="stalwart", status="unhealthy"} == 1'),
    # --- security
    Alert("A3MailerBruteForceSurge", "security", "warning", "5m",
          f"Failed logins surge on {_ON}.",
          f"{_ON} sees {{{{ $value | printf \"%.0f\" }}}} failed logins per minute, above the "
          "threshold of <<threshold>>.",
          "security", metric="a3mailer_security_attempts_total", matchers='result="failure"',
          rate="5m", record="instance:a3mailer_security_login_failures:rate5m", scale=60,
          threshold=T + "failed_login_rate_threshold"),
    Alert("A3MailerLockoutSpike", "security", "warning", "5m",
          f"Many lockouts are in force on {_ON}.",
          f"{{{{ $value }}}} lockouts are in force on {_ON}, above the threshold of "
          "<<threshold>>: a password-guessing campaign, or a client with a stale password.",
          "security", metric="a3mailer_security_active_lockouts", total=True,
          threshold=T + "active_lockouts_threshold"),
    Alert("A3MailerBanSpike", "security", "warning", "5m",
          f"Many automatic bans are in force on {_ON}.",
          f"{{{{ $value }}}} networks are banned automatically on {_ON}, above the threshold of "
          "<<threshold>>.",
          "security", metric="a3mailer_security_active_bans", matchers='source="automatic"',
          threshold=T + "automatic_bans_threshold"),
    Alert("A3MailerRateLimitSurge", "security", "warning", "10m",
          f"Many API requests are rate limited on {_ON}.",
          f"{_ON} refuses {{{{ $value | printf \"%.0f\" }}}} API requests per minute with 429, "
          "above the threshold of <<threshold>>.",
          "security", metric="a3mailer_security_rate_limited_total", rate="5m",
          record="instance:a3mailer_security_rate_limited:rate5m", scale=60,
          threshold=T + "rate_limited_rate_threshold"),
    Alert("A3MailerMfaFailureSpike", "security", "warning", "5m",
          f"Second-factor failures spike on {_ON}.",
          f"{_ON} sees {{{{ $value | printf \"%.0f\" }}}} failed second-factor verifications "
          "per minute (wrong, replayed or expired codes, locked users), above the threshold of "
          "<<threshold>>: someone holding passwords is trying to get past MFA.",
          "security", metric="a3mailer_mfa_verifications_total", matchers='result!="success"',
          rate="5m", record="instance:a3mailer_mfa_verification_failures:rate5m", scale=60,
          threshold=T + "mfa_failure_rate_threshold"),
    Alert("A3MailerSecurityDecisionsSlow", "security", "warning", "10m",
          f"Login decisions are slow on {_ON}.",
          f"The 99th percentile of the security engine's login decisions on {_ON} was "
          "{{ $value | printf \"%.0f\" }} ms over the last 5 minutes, above the threshold of "
          "<<threshold>> ms; the mail servers wait for every decision (is the security store "
          "slow?).",
          "performance", metric="a3mailer_performance_latency_seconds",
          matchers='path="security", window="5m", percentile="99"', scale=1000,
          threshold=T + "decision_latency_threshold"),
    Alert("A3MailerAuditChainBroken", "security", "critical", "1m",
          f"The audit log's hash chain is broken on {_ON}.",
          f"The audit log of {_ON} no longer verifies: a record was edited, deleted, reordered "
          "or truncated. Run `a3mailer-exporter audit verify` to find the first broken record.",
          "security", expr="a3mailer_security_audit_chain_ok{<<sel>>} == 0"),
    Alert("A3MailerAuditWriteFailing", "security", "critical", "1m",
          f"The audit log cannot be written on {_ON}.",
          f"{_ON} could not write {{{{ $value | printf \"%.0f\" }}}} audit records in 5 "
          "minutes (is its disk full?). Logins, verifications and admin changes go on "
          "unaudited; the exporter's log has the error.",
          "security",
          expr="sum by (<<by>>) (increase(a3mailer_security_audit_write_errors_total{<<sel>>}"
               "[5m])) > 0"),
    Alert("A3MailerSecurityStoreErrors", "security", "critical", "5m",
          f"The security store fails on {_ON}.",
          f"Calls from {_ON} to its security store (counters, lockouts, bans) are failing: "
          "{{ $value | printf \"%.2f\" }} errors per second.",
          "security",
          expr="sum by (<<by>>) (rate(a3mailer_security_store_errors_total{<<sel>>}[5m])) > 0"),
    Alert("A3MailerSecurityFailingOpen", "security", "critical", "1m",
          f"Logins are allowed unchecked on {_ON}.",
          f"{_ON} allowed {{{{ $value | printf \"%.0f\" }}}} logins in 5 minutes without checking "
          "them, because its store failed and security.store.fail_open is true.",
          "security",
          expr="sum by (<<by>>) (increase(a3mailer_security_fail_open_decisions_total{<<sel>>}"
               "[5m])) > 0"),
    # --- the exporter
    Alert("A3MailerExporterDown", "exporter", "critical", "5m",
          f"The a3mailer exporter {_ON} is down.",
          f"Prometheus has failed to scrape {_ON} for <<for>>: no monitoring and no login "
          "decisions from it.",
          "exporter", expr="up{<<sel>>} == 0"),
    Alert("A3MailerExporterNotReady", "exporter", "critical", "5m",
          f"The a3mailer exporter {_ON} is not ready.",
          f"A critical health component of {_ON} is not healthy (its state directory, or a "
          "fail-closed security store); /readyz answers 503.",
          "exporter", expr="a3mailer_exporter_ready{<<sel>>} == 0"),
    Alert("A3MailerCollectorFailing", "exporter", "warning", "15m",
          "Collector {{ $labels.collector }} fails.",
          f"The {{{{ $labels.collector }}}} collector of {_ON} has raised on every scrape for "
          "<<for>>; its metrics are missing. The exporter's log says why.",
          "exporter", expr="a3mailer_exporter_collector_success{<<sel>>} == 0"),
    Alert("A3MailerConfigReloadFailed", "exporter", "warning", "5m",
          f"The last configuration reload of {_ON} failed.",
          f"{_ON} rejected its new configuration and keeps running the previous one; "
          "`a3mailer-exporter check-config FILE` lists the problems.",
          "exporter", expr="a3mailer_exporter_config_last_reload_successful{<<sel>>} == 0"),
    Alert("A3MailerLogIngestionFailing", "exporter", "warning", "10m",
          "Log ingestion of {{ $labels.source }} fails.",
          f"{_ON} failed {{{{ $value | printf \"%.0f\" }}}} times in 10 minutes to "
          "{{ $labels.operation }} the log {{ $labels.source }}.",
          "exporter",
          expr="sum by (<<by>>, source, operation) (increase(a3mailer_log_follow_errors_total"
               "{<<sel>>}[10m])) > 0"),
    Alert("A3MailerOperationErrorRateHigh", "exporter", "warning", "15m",
          f"{{{{ $labels.path }}}} operations of {_ON} fail.",
          f"{{{{ $value | printf \"%.1f\" }}}}% of the {{{{ $labels.path }}}} operations of {_ON} "
          "failed over the performance monitor's last 15 minutes, above the threshold of "
          "<<threshold>>%: a probe, collector, scheduled check or store call that fails now "
          "and then (GET /api/v1/performance says which operation).",
          "performance", metric="a3mailer_performance_error_ratio",
          matchers='path!="http", window="15m"', scale=100,
          threshold=T + "error_rate_threshold"),
    Alert("A3MailerTracingExportFailing", "exporter", "warning", "10m",
          f"Sampled spans are dropped on {_ON}.",
          f"{_ON} has dropped {{{{ $value | printf \"%.2f\" }}}} sampled spans per second over "
          "5 minutes ({{ $labels.reason }}): the OTLP receiver at tracing.otlp_endpoint is "
          "unreachable, refusing, or slower than the span volume.",
          "performance",
          expr="sum by (<<by>>, reason) (rate(a3mailer_tracing_spans_dropped_total{<<sel>>}"
               "[5m])) > 0"),
    Alert("A3MailerAlertPushFailing", "exporter", "warning", "10m",
          f"The alert engine of {_ON} cannot push to Alertmanager.",
          f"{_ON} failed {{{{ $value | printf \"%.0f\" }}}} pushes to "
          "alerting.engine.alertmanager.url in the last 10 minutes ({{ $labels.reason }}); "
          "its in-process alerts reach no one.",
          "exporter",
          expr="sum by (<<by>>, reason) (increase(a3mailer_alert_push_failures_total{<<sel>>}"
               "[10m])) > 0"),
    Alert("A3MailerStalwartSeriesDropped", "exporter", "info", "1h",
          "Stalwart series are dropped on {{ $labels.instance }}.",
          f"{_ON} leaves {{{{ $value }}}} Stalwart series out because of "
          "monitoring.stalwart.max_series.",
          "exporter", expr='a3mailer_stalwart_dropped_series{<<sel>>, reason="max_series"} > 0'),
]

# The meta-alert of kube-prometheus: fires while an instance has info alerts but no warning
# or critical one, and the Alertmanager example lets it silence those info alerts.
INFO_INHIBITOR = Alert(
    "A3MailerInfoInhibitor", "exporter", "none", "",
    "Info alerts are held back.",
    "Fires while {{ $labels.instance }} has info alerts and no warning or critical one; the "
    "Alertmanager example inhibits info alerts with it and routes it to the null receiver.",
    "overview",
    expr='ALERTS{severity="info", alertname=~"A3Mailer.+"} == 1 unless on (<<by>>) '
         'ALERTS{alertname!="A3MailerInfoInhibitor", severity=~"warning|critical", '
         'alertstate="firing"} == 1')

ALERT_NAMES = sorted({a.name for a in ALERTS} | {INFO_INHIBITOR.name})
THRESHOLD_ALERTS = [a for a in ALERTS if a.is_threshold]


def _threshold_expr(alert: Alert) -> str:
    if alert.quantile:
        value = f'{alert.record}{{quantile="{number(alert.quantile)}"}}'
    elif alert.rate:
        value = alert.record
    else:
        matchers = f"<<sel>>, {alert.matchers}" if alert.matchers else "<<sel>>"
        value = f"{alert.metric}{{{matchers}}}"
        if alert.total:
            value = f"sum by (<<by>>) ({value})"
        if alert.until:
            value = f"({value} - time())"
    if alert.scale > 1:
        value = f"{value} * {number(alert.scale)}"
    elif alert.scale < 1:  # written as a division: / 86400 reads better than * 1.157e-05
        value = f"{value} / {number(round(1 / alert.scale))}"
    return f"{value} {alert.op} <<threshold>>"


def recording_of(alert: Alert) -> Recording:
    """The recording rule holding a rate, ratio or quantile row's value before scaling."""
    if alert.quantile:
        return Recording(alert.record, _quantile(alert.metric, alert.quantile, alert.rate),
                         (("quantile", number(alert.quantile)),))
    if alert.ratio:
        return Recording(alert.record, _ratio(alert.metric, alert.ratio, alert.rate))
    return Recording(alert.record, _rate(alert.metric, alert.matchers, alert.rate))


def threshold_recordings() -> list[Recording]:
    """The recording rules of the threshold alerts' rates, ratios and quantiles (one per
    record name)."""
    seen: dict[str, Recording] = {}
    for alert in THRESHOLD_ALERTS:
        if alert.rate and alert.record not in seen:
            seen[alert.record] = recording_of(alert)
    return list(seen.values())


def all_recordings() -> list[Recording]:
    return [*threshold_recordings(), *RECORDING_RULES]


def anchor(name: str) -> str:
    """The GitHub heading anchor of `## <name>` in a runbook page."""
    return re.sub(r"[^a-z0-9_-]", "", name.lower())


def _url(pattern: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), pattern)


def _tokens(config: Config, alert: Alert, value: ValueRenderer) -> dict[str, str]:
    override = config["alerting"]["alerts"].get(alert.name, {})
    return {"sel": config["alerting"]["selector"], "by": promql.BY,
            "threshold": value(alert.threshold) if alert.threshold else "",
            "for": override.get("for", alert.for_)}


def keep_firing_for(config: Config, alert: Alert) -> str:
    """The alert's hysteresis: alerting.keep_firing_for for threshold alerts, unless the
    alert's override sets its own; "" when none (a zero, 0s or 0m, turns it off)."""
    override = config["alerting"]["alerts"].get(alert.name, {})
    default = config["alerting"]["keep_firing_for"] if alert.is_threshold else ""
    value = str(override.get("keep_firing_for", default))
    return "" if not value or parse_duration(value) == 0 else value


def rule_for(config: Config, alert: Alert, value: ValueRenderer | None = None
             ) -> dict[str, Any] | None:
    """The alert's rule as Prometheus loads it (None when disabled); the in-process engine
    takes its labels, annotations, `for` and `keep_firing_for` from here too."""
    value = value or configured(config)
    alerting = config["alerting"]
    override = alerting["alerts"].get(alert.name, {})
    if not override.get("enabled", True):
        return None
    tokens = _tokens(config, alert, value)
    expr = _threshold_expr(alert) if alert.is_threshold else alert.expr
    labels = {"severity": override.get("severity", alert.severity),
              **alerting["labels"], **override.get("labels", {})}
    # both patterns take the same placeholders, as templates/prometheusrule.yaml fills them
    urls = {"alertname": alert.name, "family": alert.family, "anchor": anchor(alert.name),
            **dashboards.identity(config, alert.dashboard)}
    annotations = {
        "summary": promql.fill(alert.summary, tokens),
        "description": promql.fill(alert.description, tokens),
        "runbook_url": _url(alerting["runbook_url"], urls),
        "dashboard_url": _url(alerting["dashboard_url"], urls),
        **override.get("annotations", {}),
    }
    rule: dict[str, Any] = {"alert": alert.name, "expr": promql.fill(expr, tokens)}
    for_ = override.get("for", alert.for_)
    if for_:
        rule["for"] = for_
    hysteresis = keep_firing_for(config, alert)
    if hysteresis:
        rule["keep_firing_for"] = hysteresis
    rule["labels"] = labels
    rule["annotations"] = annotations
    return rule


def render_rules(config: Config, value: ValueRenderer | None = None) -> dict[str, Any]:
    """The alerting rule groups, one per family that has an enabled alert (an empty group is
    noise some linters refuse; the chart's PrometheusRule leaves it out too); thresholds
    written by `value`."""
    value = value or configured(config)
    groups = []
    for family in FAMILIES:
        members = [a for a in ALERTS if a.family == family]
        if family == "exporter":
            members.append(INFO_INHIBITOR)
        rules = [r for a in members if (r := rule_for(config, a, value)) is not None]
        if rules:
            groups.append({"name": f"a3mailer-{family}", "rules": rules})
    return {"groups": groups}


def render_recording_rules(config: Config) -> dict[str, Any]:
    tokens = {"sel": config["alerting"]["selector"], "by": promql.BY}
    rules = []
    for rec in all_recordings():
        rule: dict[str, Any] = {"record": rec.record, "expr": promql.fill(rec.expr, tokens)}
        if rec.labels:
            rule["labels"] = dict(rec.labels)
        rules.append(rule)
    return {"groups": [{"name": "a3mailer-recording", "rules": rules}]}


def referenced_series(rules: dict[str, Any]) -> Iterator[str]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield from promql.metric_names(rule["expr"])


def check_tables() -> list[str]:
    """Problems in the tables: bad fields, unknown metrics or config keys (a test runs it)."""
    from exporter.config import load_config

    config = load_config()
    problems = []
    records = {r.record for r in all_recordings()}
    names: dict[str, set[str]] = {}
    for alert in [*ALERTS, INFO_INHIBITOR]:
        where = f"{alert.name} ({alert.severity})"
        if not re.fullmatch(r"A3Mailer[A-Z][A-Za-z0-9]+", alert.name):
            problems.append(f"{where}: name must be CamelCase with the A3Mailer prefix")
        if alert.family not in FAMILIES:
            problems.append(f"{where}: unknown family {alert.family!r}")
        if alert is not INFO_INHIBITOR and alert.severity not in SEVERITIES:
            problems.append(f"{where}: severity must be one of {SEVERITIES}")
        if alert.severity in names.setdefault(alert.name, set()):
            problems.append(f"{where}: two rules with the same name and severity")
        names[alert.name].add(alert.severity)
        if alert.is_threshold == bool(alert.expr):
            problems.append(f"{where}: set exactly one of metric and expr")
        if alert.op not in COMPARISONS:
            problems.append(f"{where}: unknown comparison {alert.op!r}")
        if alert.scale < 1 and float(round(1 / alert.scale)) != 1 / alert.scale:
            problems.append(f"{where}: a scale below 1 must be 1 / an integer")
        if alert.rate and not alert.record:
            problems.append(f"{where}: a rate alert names its recording rule")
        if alert.is_threshold:
            problems += [f"{where}: {p}" for p in _row_problems(alert)]
        if alert.threshold:
            try:
                lookup(config, alert.threshold)
            except KeyError:
                problems.append(f"{where}: unknown config key {alert.threshold}")
        if alert.dashboard not in dashboards.KEYS:
            problems.append(f"{where}: unknown dashboard {alert.dashboard!r}")
    rendered = [render_rules(config), render_recording_rules(config)]
    for rules in rendered:
        for name in referenced_series(rules):
            base = promql.base_metric(name, catalogue.METRICS)
            if base not in catalogue.METRICS and base not in records and (
                    base not in promql.SYNTHETIC):
                problems.append(f"rules: {name} is neither catalogued nor recorded")
    return problems


def _row_problems(alert: Alert) -> list[str]:
    """What the engine (exporter/rule_values.py) needs of a threshold row."""
    from exporter.rule_values import parse_matchers

    problems = []
    spec = catalogue.METRICS.get(alert.metric)
    if spec is None:
        return [f"unknown metric {alert.metric}"]
    for matchers in (alert.matchers, alert.ratio):
        try:
            parse_matchers(matchers)
        except ValueError as exc:
            problems.append(str(exc))
    if (alert.ratio or alert.quantile) and not alert.rate:
        problems.append("a ratio or quantile needs a rate window")
    if alert.rate and (alert.total or alert.until):
        problems.append("a rate is summed per instance already; total and until do not apply")
    if alert.quantile and not (0 < alert.quantile < 1 and spec.type == "histogram"):
        problems.append("a quantile is between 0 and 1, of a histogram")
    if alert.rate and not alert.quantile and spec.type != "counter":
        problems.append("a rate or ratio reads a counter")
    return problems
