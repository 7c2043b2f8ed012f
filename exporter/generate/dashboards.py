"""The Grafana dashboards, as data (grafana.py builds them with grafanalib).

`DASHBOARDS` lists every dashboard as rows of `Panel`s; a panel names its kind,
unit, description, queries (written with the tokens of `promql.py`) and, when a
configured threshold applies, the config key path of that threshold, which
becomes the panel's threshold steps (and the line on a time series). Rows are
plain lists, so a later feature adds its row by appending one (`SECURITY_ROWS`,
`PERFORMANCE_ROWS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from exporter.config import Config
from exporter.generate import promql

T = "monitoring.alert_thresholds."
KINDS = ("timeseries", "stat", "gauge", "bargauge", "table", "state-timeline")

# value -> (text, colour) for panels that show a 0/1 state
STATES: dict[str, tuple[tuple[int, str, str], ...]] = {
    "up": ((0, "down", "red"), (1, "up", "green")),
    "ok": ((0, "failing", "red"), (1, "ok", "green")),
    "ready": ((0, "not ready", "red"), (1, "ready", "green")),
    "healthy": ((0, "not healthy", "red"), (1, "healthy", "green")),
    "listed": ((0, "not listed", "green"), (1, "listed", "red")),
    "verified": ((0, "not verified", "red"), (1, "verified", "green")),
}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str
    unit: str
    description: str
    queries: tuple[Query, ...]
    threshold: str = ""  # config key path: the red step (and line) from this value up
    warning: str = ""  # config key path: an orange step before it
    below: bool = False  # the bad side is below: red under threshold, green from warning
    states: str = ""  # a STATES mapping
    width: int = 8
    height: int = 8
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    key: str
    title: str
    description: str
    rows: list[Row] = field(default_factory=list)


def q(expr: str, legend: str = "", instant: bool = False) -> Query:
    return Query(expr, legend, instant)


RI = "$__rate_interval"
ON = "{{instance}}"

# --------------------------------------------------------------------------- Overview
OVERVIEW_ROWS: list[Row] = [
    Row("Health", (
        Panel("Exporters up", "stat", "short",
              "Scrape targets of the exporter that Prometheus reaches (up == 1), of all "
              "selected.", (q("sum(up{<<sel>>})", "up"), q("count(up{<<sel>>})", "targets")),
              width=4, height=5),
        Panel("Ready", "stat", "none",
              "Whether every critical health component is healthy (GET /readyz answers 200).",
              (q("a3mailer_exporter_ready{<<sel>>}", ON),), states="ready", width=4, height=5),
        Panel("Firing alerts", "stat", "short",
              "A3Mailer alerts firing now for the selected instances (Prometheus's ALERTS "
              "series).",
              (q('count(ALERTS{alertname=~"A3Mailer.+", alertname!="A3MailerInfoInhibitor", '
                 'alertstate="firing", <<vars>>}) or vector(0)', "firing"),),
              width=4, height=5),
        Panel("Health components", "state-timeline", "none",
              "Each health component's status over time (healthy or not); details in the "
              "exporter's /health.",
              (q('max by (component) (a3mailer_health_status{<<sel>>, status="healthy"})',
                 "{{component}}"),), states="healthy", width=12, height=5),
    )),
    Row("Alerts", (
        Panel("Firing alerts", "table", "none",
              "The A3Mailer alerts firing now, with their labels.",
              (q('ALERTS{alertname=~"A3Mailer.+", alertname!="A3MailerInfoInhibitor", '
                 'alertstate="firing", <<vars>>}', instant=True),),
              width=24, height=6),
    )),
    Row("Key indicators", (
        Panel("Probe success", "stat", "percentunit",
              "Share of mail service probes (SMTP, IMAP, POP3, HTTP) whose last run succeeded.",
              (q("avg(a3mailer_probe_success{<<sel>>})", "success"),), width=4, height=5,
              min=0, max=1),
        Panel("Delivery round trip", "stat", "s",
              "Submission-to-mailbox time of the last test message, per instance.",
              (q("a3mailer_delivery_roundtrip_last_seconds{<<sel>>}", ON),),
              threshold=T + "delivery_roundtrip_threshold", width=4, height=5),
        Panel("Mail queue", "stat", "short",
              "Messages in every checked mail queue (Postfix and Stalwart), per instance.",
              (q("a3mailer_queue_total_messages{<<sel>>}", ON),),
              threshold=T + "queue_size_threshold", width=4, height=5),
        Panel("Failed logins", "stat", "short",
              "Failed logins per minute reported to the security engine, per instance.",
              (q('sum by (instance) (rate(a3mailer_security_attempts_total{<<sel>>, '
                 f'result="failure"}}[{RI}])) * 60', ON),),
              threshold=T + "failed_login_rate_threshold", width=4, height=5),
        Panel("CPU", "gauge", "percent",
              "Busy share of all CPUs of the busiest selected host.",
              (q("max(a3mailer_system_cpu_usage_ratio{<<sel>>}) * 100", "cpu"),),
              threshold=T + "cpu_usage_threshold", width=4, height=5, min=0, max=100),
        Panel("Memory", "gauge", "percent",
              "Memory in use (available memory counted as free) of the fullest selected host.",
              (q("max(a3mailer_system_memory_usage_ratio{<<sel>>}) * 100", "memory"),),
              threshold=T + "memory_usage_threshold", width=4, height=5, min=0, max=100),
    )),
]

# --------------------------------------------------------------------------- System
SYSTEM_ROWS: list[Row] = [
    Row("CPU and memory", (
        Panel("CPU usage", "timeseries", "percent",
              "Busy share of all CPU time (not idle or iowait); the line is "
              "monitoring.alert_thresholds.cpu_usage_threshold.",
              (q("a3mailer_system_cpu_usage_ratio{<<sel>>} * 100", ON),),
              threshold=T + "cpu_usage_threshold", min=0, max=100),
        Panel("Load average", "timeseries", "short",
              "1, 5 and 15 minute load averages, and the number of logical CPUs.",
              (q("a3mailer_system_load1{<<sel>>}", "1m {{instance}}"),
               q("a3mailer_system_load5{<<sel>>}", "5m {{instance}}"),
               q("a3mailer_system_load15{<<sel>>}", "15m {{instance}}"),
               q("a3mailer_system_cpus{<<sel>>}", "CPUs {{instance}}"))),
        Panel("Memory usage", "timeseries", "percent",
              "Memory in use (1 - available / total); the line is "
              "monitoring.alert_thresholds.memory_usage_threshold.",
              (q("a3mailer_system_memory_usage_ratio{<<sel>>} * 100", ON),),
              threshold=T + "memory_usage_threshold", min=0, max=100),
        Panel("Memory", "timeseries", "bytes",
              "Total, used and available memory, and swap in use.",
              (q("a3mailer_system_memory_total_bytes{<<sel>>}", "total {{instance}}"),
               q("a3mailer_system_memory_used_bytes{<<sel>>}", "used {{instance}}"),
               q("a3mailer_system_memory_available_bytes{<<sel>>}", "available {{instance}}"),
               q("a3mailer_system_swap_used_bytes{<<sel>>}", "swap {{instance}}"))),
        Panel("CPU time by mode", "timeseries", "percentunit",
              "Share of CPU time per mode, summed over all CPUs and divided by their number.",
              (q(f"sum by (mode) (rate(a3mailer_system_cpu_seconds_total{{<<sel>>}}[{RI}])) "
                 "/ scalar(sum(a3mailer_system_cpus{<<sel>>}))", "{{mode}}"),)),
        Panel("Uptime", "stat", "s", "Time since each host booted.",
              (q("a3mailer_system_uptime_seconds{<<sel>>}", ON),)),
    )),
    Row("Filesystems", (
        Panel("Disk usage", "bargauge", "percent",
              "Share of each filesystem in use, as df counts it; red from "
              "monitoring.alert_thresholds.disk_usage_threshold.",
              (q("a3mailer_system_disk_usage_ratio{<<sel>>} * 100",
                 "{{instance}} {{mountpoint}}", instant=True),),
              threshold=T + "disk_usage_threshold", width=12, min=0, max=100),
        Panel("Disk usage over time", "timeseries", "percent",
              "Share of each filesystem in use; the line is the disk usage threshold.",
              (q("a3mailer_system_disk_usage_ratio{<<sel>>} * 100",
                 "{{instance}} {{mountpoint}}"),),
              threshold=T + "disk_usage_threshold", width=12, min=0, max=100),
        Panel("Free space", "timeseries", "bytes",
              "Space left to unprivileged users per filesystem.",
              (q("a3mailer_system_disk_free_bytes{<<sel>>}", "{{instance}} {{mountpoint}}"),),
              width=12),
        Panel("Disk I/O", "timeseries", "Bps",
              "Bytes read (positive) and written (negative) per second per block device.",
              (q(f"rate(a3mailer_system_disk_read_bytes_total{{<<sel>>}}[{RI}])",
                 "read {{instance}} {{device}}"),
               q(f"-rate(a3mailer_system_disk_written_bytes_total{{<<sel>>}}[{RI}])",
                 "written {{instance}} {{device}}")), width=12),
    )),
    Row("Network", (
        Panel("Network traffic", "timeseries", "Bps",
              "Bytes received (positive) and sent (negative) per second per device.",
              (q(f"rate(a3mailer_system_network_receive_bytes_total{{<<sel>>}}[{RI}])",
                 "in {{instance}} {{device}}"),
               q(f"-rate(a3mailer_system_network_transmit_bytes_total{{<<sel>>}}[{RI}])",
                 "out {{instance}} {{device}}"))),
        Panel("Network errors and drops", "timeseries", "pps",
              "Packets per second lost to errors or drops, per device and direction.",
              (q(f"rate(a3mailer_system_network_receive_errors_total{{<<sel>>}}[{RI}]) + "
                 f"rate(a3mailer_system_network_receive_drops_total{{<<sel>>}}[{RI}])",
                 "in {{instance}} {{device}}"),
               q(f"rate(a3mailer_system_network_transmit_errors_total{{<<sel>>}}[{RI}]) + "
                 f"rate(a3mailer_system_network_transmit_drops_total{{<<sel>>}}[{RI}])",
                 "out {{instance}} {{device}}"))),
        Panel("TCP connections", "timeseries", "short",
              "TCP sockets by state; the line is "
              "monitoring.alert_thresholds.connection_count_threshold (established).",
              (q("a3mailer_system_tcp_connections{<<sel>>}", "{{instance}} {{state}}"),),
              threshold=T + "connection_count_threshold"),
    )),
]

# --------------------------------------------------------------------------- Mail services
MAIL_ROWS: list[Row] = [
    Row("Probes", (
        Panel("Probe status", "state-timeline", "none",
              "Whether each protocol probe's scheduled run succeeded; the reason of a failure "
              "is in /health.",
              (q("a3mailer_probe_success{<<sel>>}", "{{probe}} ({{protocol}})"),),
              states="ok", width=12),
        Panel("Probe duration", "timeseries", "ms",
              "Total time of each probe's last run; the line is "
              "monitoring.alert_thresholds.response_time_threshold.",
              (q('a3mailer_probe_duration_seconds{<<sel>>, phase="total"} * 1000',
                 "{{probe}}"),), threshold=T + "response_time_threshold", width=12),
        Panel("Probe phases", "timeseries", "ms",
              "Time of each phase (connect, tls, banner, auth, select, response) of the last "
              "run.",
              (q('a3mailer_probe_duration_seconds{<<sel>>, phase!="total"} * 1000',
                 "{{probe}} {{phase}}"),), width=12),
        Panel("HTTP status", "stat", "none",
              "HTTP status code answered to each HTTP probe (JMAP, /healthz).",
              (q("a3mailer_probe_http_status_code{<<sel>>}", "{{probe}}"),), width=12),
    )),
    Row("TLS", (
        Panel("Certificate expiry", "table", "d",
              "Days until each probed server certificate expires; orange under "
              "cert_expiry_warning_days, red under cert_expiry_critical_days.",
              (q("(a3mailer_tls_cert_not_after_timestamp_seconds{<<sel>>} - time()) / 86400",
                 "{{probe}}", instant=True),),
              threshold=T + "cert_expiry_critical_days", warning=T + "cert_expiry_warning_days",
              below=True, width=12),
        Panel("Certificate verified", "state-timeline", "none",
              "Whether each certificate chain and name verified.",
              (q("a3mailer_probe_tls_verified{<<sel>>}", "{{probe}}"),), states="verified",
              width=6),
        Panel("TLS version", "table", "none",
              "TLS version negotiated by each probe.",
              (q("a3mailer_probe_tls_version_info{<<sel>>}", instant=True),), width=6),
    )),
    Row("Delivery round trip", (
        Panel("Round trip", "timeseries", "s",
              "Submission-to-mailbox time of each scheduled test message; the line is "
              "monitoring.alert_thresholds.delivery_roundtrip_threshold.",
              (q("a3mailer_delivery_roundtrip_last_seconds{<<sel>>}", ON),),
              threshold=T + "delivery_roundtrip_threshold"),
        Panel("Round trip status", "state-timeline", "none",
              "Whether the last test message arrived within monitoring.delivery.timeout.",
              (q("a3mailer_delivery_roundtrip_success{<<sel>>}", ON),), states="ok"),
        Panel("Messages not arrived", "timeseries", "short",
              "Test messages of earlier runs still missing.",
              (q("a3mailer_delivery_roundtrip_pending_messages{<<sel>>}", ON),)),
    )),
    Row("Queues", (
        Panel("Queued messages", "timeseries", "short",
              "Messages per queue (Postfix's five, Stalwart's) and in all; the line is "
              "monitoring.alert_thresholds.queue_size_threshold.",
              (q("a3mailer_queue_messages{<<sel>>}", "{{instance}} {{queue}}"),
               q("a3mailer_queue_total_messages{<<sel>>}", "total {{instance}}")),
              threshold=T + "queue_size_threshold"),
        Panel("Oldest message", "timeseries", "s",
              "Age of the oldest message in each Postfix queue.",
              (q("a3mailer_queue_oldest_message_age_seconds{<<sel>>}",
                 "{{instance}} {{queue}}"),)),
        Panel("Queue size", "timeseries", "bytes",
              "Bytes of the messages in each Postfix queue.",
              (q("a3mailer_queue_size_bytes{<<sel>>}", "{{instance}} {{queue}}"),)),
        Panel("Queue checks", "state-timeline", "none",
              "Whether the last queue check of each source succeeded.",
              (q("a3mailer_queue_check_success{<<sel>>}", "{{instance}} {{source}}"),),
              states="ok", width=12),
        Panel("Recipients waiting", "timeseries", "short",
              "Recipients still to be delivered per Postfix queue.",
              (q("a3mailer_queue_recipients{<<sel>>}", "{{instance}} {{queue}}"),), width=12),
    )),
    Row("DNS and DNSBL", (
        Panel("Mail DNS checks", "state-timeline", "none",
              "MX, SPF, DMARC, DKIM, MTA-STS, TLSA and FCrDNS checks per domain at the last "
              "scheduled run.",
              (q("a3mailer_dns_check_success{<<sel>>}", "{{domain}} {{check}}"),),
              states="ok", width=12),
        Panel("DKIM keys", "state-timeline", "none",
              "Whether each configured DKIM selector publishes a usable key.",
              (q("a3mailer_dns_dkim_success{<<sel>>}", "{{domain}} {{selector}}"),),
              states="ok", width=12),
        Panel("DMARC policy", "table", "none",
              "The p= policy each domain publishes (1 marks the one in force).",
              (q("a3mailer_dns_dmarc_policy{<<sel>>} == 1", instant=True),), width=6),
        Panel("MTA-STS mode", "table", "none",
              "The mode of each domain's MTA-STS policy (1 marks the one in force).",
              (q("a3mailer_dns_mta_sts_mode{<<sel>>} == 1", instant=True),), width=6),
        Panel("SPF lookups", "bargauge", "short",
              "DNS-querying SPF terms per domain; receivers fail SPF above 10.",
              (q("a3mailer_dns_spf_lookups{<<sel>>}", "{{domain}}", instant=True),),
              width=12, min=0, max=11),
        Panel("DNSBL listings", "state-timeline", "none",
              "Whether any IP of each set is listed by each DNSBL zone.",
              (q("a3mailer_dnsbl_listed{<<sel>>}", "{{ip_set}} {{zone}}"),), states="listed",
              width=12),
        Panel("DNSBL answers", "state-timeline", "none",
              "Whether every DNSBL query got a definite answer (no timeouts, refusals).",
              (q("a3mailer_dnsbl_check_success{<<sel>>}", "{{ip_set}} {{zone}}"),),
              states="ok", width=12),
    )),
    Row("A3Mailer / Stalwart", (
        Panel("Stalwart reachable", "state-timeline", "none",
              "Whether the last poll of Stalwart's /metrics/prometheus succeeded.",
              (q("a3mailer_stalwart_up{<<sel>>}", ON),), states="up"),
        Panel("Open connections", "timeseries", "short",
              "Connections Stalwart has open, per protocol.",
              (q("a3mailer_stalwart_smtp_active_connections{<<sel>>}", "smtp {{instance}}"),
               q("a3mailer_stalwart_imap_active_connections{<<sel>>}", "imap {{instance}}"),
               q("a3mailer_stalwart_pop3_active_connections{<<sel>>}", "pop3 {{instance}}"),
               q("a3mailer_stalwart_http_active_connections{<<sel>>}", "http {{instance}}"))),
        Panel("Deliveries", "timeseries", "ops",
              "Stalwart delivery events per second.",
              (q(f"rate(a3mailer_stalwart_delivery_delivered_total{{<<sel>>}}[{RI}])",
                 "delivered {{instance}}"),
               q(f"rate(a3mailer_stalwart_delivery_message_rejected_total{{<<sel>>}}[{RI}])",
                 "rejected {{instance}}"),
               q(f"rate(a3mailer_stalwart_delivery_dsn_perm_fail_total{{<<sel>>}}[{RI}])",
                 "bounced {{instance}}"))),
    )),
    Row("Logs", (
        Panel("Logged deliveries", "timeseries", "ops",
              "Delivery attempts per recipient found in the logs, by status.",
              (q(f"sum by (status) (rate(a3mailer_mail_deliveries_total{{<<sel>>}}[{RI}]))",
                 "{{status}}"),)),
        Panel("SMTP rejections", "timeseries", "ops",
              "Rejections found in the logs, by reply class and stage.",
              (q(f"sum by (class, stage) (rate(a3mailer_mail_rejects_total{{<<sel>>}}[{RI}]))",
                 "{{class}} {{stage}}"),)),
        Panel("Logged logins", "timeseries", "ops",
              "Logins found in the logs, by service and result; TLS handshake failures.",
              (q(f"sum by (service, result) (rate(a3mailer_auth_events_total{{<<sel>>}}[{RI}]))",
                 "{{service}} {{result}}"),
               q(f"sum by (service) (rate(a3mailer_tls_failures_total{{<<sel>>}}[{RI}]))",
                 "TLS failure {{service}}"))),
    )),
]

# --------------------------------------------------------------------------- Security
SECURITY_ROWS: list[Row] = [
    Row("Logins and decisions", (
        Panel("Login attempts", "timeseries", "ops",
              "Logins reported to the security engine per second, by protocol and result.",
              (q(f"sum by (protocol, result) (rate(a3mailer_security_attempts_total{{<<sel>>}}"
                 f"[{RI}]))", "{{protocol}} {{result}}"),)),
        Panel("Failed logins per minute", "timeseries", "short",
              "Failed logins per minute per instance; the line is "
              "monitoring.alert_thresholds.failed_login_rate_threshold.",
              (q('sum by (instance) (rate(a3mailer_security_attempts_total{<<sel>>, '
                 f'result="failure"}}[{RI}])) * 60', ON),),
              threshold=T + "failed_login_rate_threshold"),
        Panel("Decisions", "timeseries", "ops",
              "Login decisions per second by action and reason.",
              (q(f"sum by (action, reason) (rate(a3mailer_security_decisions_total{{<<sel>>}}"
                 f"[{RI}]))", "{{action}} {{reason}}"),)),
    )),
    Row("Lockouts and bans", (
        Panel("Lockouts in force", "timeseries", "short",
              "Lockouts in force per instance, in all and by scope; the line is "
              "monitoring.alert_thresholds.active_lockouts_threshold (all scopes).",
              (q("sum by (instance) (a3mailer_security_active_lockouts{<<sel>>})",
                 "all {{instance}}"),
               q("sum by (instance, scope) (a3mailer_security_active_lockouts{<<sel>>})",
                 "{{instance}} {{scope}}")),
              threshold=T + "active_lockouts_threshold"),
        Panel("Bans in force", "timeseries", "short",
              "Banned networks per instance by how they were banned; the line is "
              "monitoring.alert_thresholds.automatic_bans_threshold (automatic).",
              (q("sum by (instance, source) (a3mailer_security_active_bans{<<sel>>})",
                 "{{instance}} {{source}}"),),
              threshold=T + "automatic_bans_threshold"),
        Panel("Tracked keys", "timeseries", "short",
              "Failure-counter keys held in memory (capped by "
              "security.store.max_tracked_keys).",
              (q("a3mailer_security_tracked_keys{<<sel>>}", ON),)),
    )),
    Row("Rate limiting and front ends", (
        Panel("Rate-limited requests", "timeseries", "short",
              "API requests refused with 429 per minute per instance, in all and by client "
              "class; the line is monitoring.alert_thresholds.rate_limited_rate_threshold "
              "(all classes).",
              (q("sum by (instance) (rate(a3mailer_security_rate_limited_total{<<sel>>}"
                 f"[{RI}])) * 60", "all {{instance}}"),
               q("sum by (instance, class) (rate(a3mailer_security_rate_limited_total"
                 f"{{<<sel>>}}[{RI}])) * 60", "{{instance}} {{class}}")),
              threshold=T + "rate_limited_rate_threshold"),
        Panel("Front-end requests", "timeseries", "ops",
              "Requests to the Dovecot policy endpoint and the Stalwart webhook, by outcome.",
              (q("sum by (frontend, outcome) (rate(a3mailer_security_frontend_requests_total"
                 f"{{<<sel>>}}[{RI}]))", "{{frontend}} {{outcome}}"),)),
        Panel("Postfix policy", "timeseries", "ops",
              "Postfix policy delegation answers by action, and errors by reason.",
              (q("sum by (action) (rate(a3mailer_security_postfix_requests_total{<<sel>>}"
                 f"[{RI}]))", "{{action}}"),
               q("sum by (reason) (rate(a3mailer_security_postfix_errors_total{<<sel>>}"
                 f"[{RI}]))", "error {{reason}}"))),
    )),
    Row("Store and audit", (
        Panel("Store errors", "timeseries", "ops",
              "Failed security store calls per second by operation, and logins allowed "
              "unchecked because the store failed (fail_open).",
              (q("sum by (operation) (rate(a3mailer_security_store_errors_total{<<sel>>}"
                 f"[{RI}]))", "{{operation}}"),
               q(f"sum(rate(a3mailer_security_fail_open_decisions_total{{<<sel>>}}[{RI}]))",
                 "failed open"))),
        Panel("Audit records", "timeseries", "ops",
              "Audit records written per second, by type.",
              (q(f"sum by (type) (rate(a3mailer_security_audit_events_total{{<<sel>>}}[{RI}]))",
                 "{{type}}"),)),
        Panel("Audit chain", "state-timeline", "none",
              "Whether the audit log's hash chain verified at the last check.",
              (q("a3mailer_security_audit_chain_ok{<<sel>>}", ON),), states="ok"),
    )),
]

SECURITY_ROWS.append(Row("Multi-factor authentication", (
    Panel("Second-factor verifications", "timeseries", "ops",
          "Verifications per second by method (totp, recovery, email, sms, webauthn) and "
          "result.",
          (q(f"sum by (method, result) (rate(a3mailer_mfa_verifications_total{{<<sel>>}}"
             f"[{RI}]))", "{{method}} {{result}}"),)),
    Panel("Failed second factors per minute", "timeseries", "short",
          "Verifications that did not succeed, per minute per instance; the line is "
          "monitoring.alert_thresholds.mfa_failure_rate_threshold.",
          (q('sum by (instance) (rate(a3mailer_mfa_verifications_total{<<sel>>, '
             f'result!="success"}}[{RI}])) * 60', ON),),
          threshold=T + "mfa_failure_rate_threshold"),
    Panel("Code deliveries and enrolments", "timeseries", "ops",
          "One-time codes sent per second by channel and result, and enrolment changes.",
          (q("sum by (channel, result) (rate(a3mailer_mfa_code_deliveries_total{<<sel>>}"
             f"[{RI}]))", "{{channel}} {{result}}"),
           q("sum by (method, action) (rate(a3mailer_mfa_enrollments_total{<<sel>>}"
             f"[{RI}]))", "{{method}} {{action}}"))),
)))
SECURITY_ROWS.append(Row("Sessions, API keys and credentials", (
    Panel("Live sessions and API keys", "timeseries", "short",
          "Live web sessions, and API keys neither expired nor revoked.",
          (q("a3mailer_identity_active_sessions{<<sel>>}", "sessions {{instance}}"),
           q("a3mailer_identity_active_api_keys{<<sel>>}", "API keys {{instance}}"))),
    Panel("Credential verifications", "timeseries", "ops",
          "API key, session, CSRF, OIDC and SAML verifications per second by result, and "
          "failures by reason.",
          (q("sum by (method, result) (rate(a3mailer_identity_verifications_total{<<sel>>}"
             f"[{RI}]))", "{{method}} {{result}}"),
           q("sum by (method, reason) (rate(a3mailer_identity_verification_failures_total"
             f"{{<<sel>>}}[{RI}]))", "failed {{method}} {{reason}}"))),
    Panel("CSRF and password refusals", "timeseries", "ops",
          "CSRF tokens refused and password-policy violations per second, by reason.",
          (q(f"sum by (reason) (rate(a3mailer_identity_csrf_failures_total{{<<sel>>}}[{RI}]))",
             "CSRF {{reason}}"),
           q("sum by (reason) (rate(a3mailer_identity_password_rejections_total{<<sel>>}"
             f"[{RI}]))", "password {{reason}}"))),
)))

# --------------------------------------------------------------------------- Performance
PERFORMANCE_ROWS: list[Row] = [
    Row("Exporter API", (
        Panel("Request latency", "timeseries", "ms",
              "50th, 95th and 99th percentile of HTTP response times (security decisions, "
              "webhooks, scrapes) per instance; the line is "
              "monitoring.alert_thresholds.response_time_threshold (p95).",
              tuple(q(f"histogram_quantile({p}, sum by (le, instance) (rate("
                      f"a3mailer_exporter_http_request_duration_seconds_bucket{{<<sel>>}}"
                      f"[{RI}]))) * 1000", f"p{round(p * 100)} {{{{instance}}}}")
                    for p in (0.5, 0.95, 0.99)),
              threshold=T + "response_time_threshold"),
        Panel("Requests", "timeseries", "reqps",
              "HTTP requests per second by route and status code.",
              (q("sum by (handler, code) (rate(a3mailer_exporter_http_requests_total{<<sel>>}"
                 f"[{RI}]))", "{{handler}} {{code}}"),)),
        Panel("Server errors", "timeseries", "percent",
              "Share of HTTP requests answered 5xx; the line is "
              "monitoring.alert_thresholds.error_rate_threshold.",
              (q("instance:a3mailer_exporter_http_errors:ratio_rate5m{<<vars>>} * 100", ON),),
              threshold=T + "error_rate_threshold"),
        Panel("Decision latency", "timeseries", "ms",
              "95th percentile of the security engine's decision time (store calls included).",
              (q("histogram_quantile(0.95, sum by (le, instance) (rate("
                 f"a3mailer_security_decision_duration_seconds_bucket{{<<sel>>}}[{RI}]))) * 1000",
                 ON),)),
    )),
    Row("Mail server", (
        Panel("Stalwart request time", "timeseries", "ms",
              "Mean time of Stalwart's SMTP, IMAP, POP3 and HTTP requests over 5 minutes; the "
              "line is monitoring.alert_thresholds.response_time_threshold.",
              (q("instance_protocol:a3mailer_stalwart_request_time_seconds:mean5m{<<vars>>} * 1000",
                 "{{instance}} {{protocol}}"),),
              threshold=T + "response_time_threshold"),
        Panel("Stalwart store time", "timeseries", "ms",
              "Mean time of Stalwart's data store reads and writes.",
              (q(f"rate(a3mailer_stalwart_store_data_read_time_seconds_sum{{<<sel>>}}[{RI}]) / "
                 f"rate(a3mailer_stalwart_store_data_read_time_seconds_count{{<<sel>>}}[{RI}]) "
                 "* 1000", "read {{instance}}"),
               q(f"rate(a3mailer_stalwart_store_data_write_time_seconds_sum{{<<sel>>}}[{RI}]) / "
                 f"rate(a3mailer_stalwart_store_data_write_time_seconds_count{{<<sel>>}}[{RI}])"
                 " * 1000", "write {{instance}}"))),
        Panel("Delivery time", "timeseries", "s",
              "Mean time from submission to delivery of Stalwart's outgoing mail.",
              (q(f"rate(a3mailer_stalwart_delivery_total_time_seconds_sum{{<<sel>>}}[{RI}]) / "
                 f"rate(a3mailer_stalwart_delivery_total_time_seconds_count{{<<sel>>}}[{RI}])",
                 ON),)),
    )),
]

PERFORMANCE_ROWS.append(Row("Performance monitor", (
    Panel("Operations per path", "timeseries", "ops",
          "Operations per second of each instrumented path (http, security, store, collector, "
          "schedule) over the performance monitor's 1-minute window.",
          (q('a3mailer_performance_operations_per_second{<<sel>>, window="1m"}',
             "{{instance}} {{path}}"),)),
    Panel("Failing operations per path", "timeseries", "percent",
          "Share of each path's operations that failed over the 15-minute window; the line is "
          "monitoring.alert_thresholds.error_rate_threshold (A3MailerOperationErrorRateHigh, "
          "every path but http).",
          (q('a3mailer_performance_error_ratio{<<sel>>, window="15m"} * 100',
             "{{instance}} {{path}}"),),
          threshold=T + "error_rate_threshold"),
    Panel("Login decision p99", "timeseries", "ms",
          "99th percentile of the security engine's login decisions over 5 minutes; the line "
          "is monitoring.alert_thresholds.decision_latency_threshold.",
          (q('a3mailer_performance_latency_seconds{<<sel>>, path="security", window="5m", '
             'percentile="99"} * 1000', ON),),
          threshold=T + "decision_latency_threshold"),
    Panel("Latency p95 per path", "timeseries", "s",
          "95th percentile latency of each path's operations over 5 minutes (within 2%).",
          (q('a3mailer_performance_latency_seconds{<<sel>>, window="5m", percentile="95"}',
             "{{instance}} {{path}}"),), width=12),
    Panel("Latency p99 per path", "timeseries", "s",
          "99th percentile latency of each path's operations over 5 minutes (within 2%).",
          (q('a3mailer_performance_latency_seconds{<<sel>>, window="5m", percentile="99"}',
             "{{instance}} {{path}}"),), width=12),
)))
PERFORMANCE_ROWS.append(Row("Tracing", (
    Panel("Spans exported and dropped", "timeseries", "ops",
          "Sampled spans the OTLP receiver accepted per second, and spans dropped by reason "
          "(queue_full, export_failed: A3MailerTracingExportFailing).",
          (q("sum by (instance) (rate(a3mailer_tracing_spans_exported_total{<<sel>>}"
             f"[{RI}]))", "exported {{instance}}"),
           q("sum by (instance, reason) (rate(a3mailer_tracing_spans_dropped_total{<<sel>>}"
             f"[{RI}]))", "dropped {{instance}} {{reason}}"))),
    Panel("Span queue", "timeseries", "short",
          "Sampled spans waiting in the batch processor's queue for export.",
          (q("a3mailer_tracing_queue_spans{<<sel>>}", ON),)),
    Panel("Sampling ratio", "stat", "percentunit",
          "Share of new traces sampled (tracing.sampling_rate); 0 when tracing is off.",
          (q("a3mailer_tracing_sampling_ratio{<<sel>>}", ON),), min=0, max=1),
)))

# --------------------------------------------------------------------------- Exporter
EXPORTER_ROWS: list[Row] = [
    Row("Process", (
        Panel("Build", "table", "none", "Exporter and Python version of each instance.",
              (q("a3mailer_exporter_build_info{<<sel>>}", instant=True),), width=12),
        Panel("Configuration reload", "state-timeline", "none",
              "Whether the last configuration (re)load succeeded.",
              (q("a3mailer_exporter_config_last_reload_successful{<<sel>>}", ON),),
              states="ok", width=12),
        Panel("CPU", "timeseries", "percentunit", "CPU time the exporter process uses.",
              (q(f"rate(process_cpu_seconds_total{{<<sel>>}}[{RI}])", ON),)),
        Panel("Resident memory", "timeseries", "bytes", "Resident memory of the process.",
              (q("process_resident_memory_bytes{<<sel>>}", ON),)),
        Panel("File descriptors", "timeseries", "percentunit",
              "Open file descriptors as a share of the limit.",
              (q("process_open_fds{<<sel>>} / process_max_fds{<<sel>>}", ON),), min=0, max=1),
    )),
    Row("Scrape", (
        Panel("Collector duration", "timeseries", "s",
              "Time each collector took during the scrape.",
              (q("a3mailer_exporter_collector_duration_seconds{<<sel>>}",
                 "{{instance}} {{collector}}"),)),
        Panel("Collector status", "state-timeline", "none",
              "Whether each collector succeeded during the scrape.",
              (q("a3mailer_exporter_collector_success{<<sel>>}", "{{instance}} {{collector}}"),),
              states="ok"),
        Panel("Scrape duration", "timeseries", "s",
              "How long Prometheus's scrape of each instance took, and the samples it got.",
              (q("scrape_duration_seconds{<<sel>>}", ON),)),
        Panel("Samples per scrape", "timeseries", "short",
              "Samples Prometheus got from each instance per scrape.",
              (q("scrape_samples_scraped{<<sel>>}", ON),)),
        Panel("History entries", "timeseries", "short",
              "Snapshots held in the in-memory monitoring history.",
              (q("a3mailer_monitoring_history_entries{<<sel>>}", ON),)),
        Panel("Health check duration", "timeseries", "s",
              "How long each health component's last check took.",
              (q("a3mailer_health_check_duration_seconds{<<sel>>}",
                 "{{instance}} {{component}}"),)),
    )),
    Row("Sources", (
        Panel("Log ingestion", "timeseries", "ops",
              "Log lines read per second by file and result, and ingestion errors.",
              (q(f"sum by (source, result) (rate(a3mailer_log_lines_total{{<<sel>>}}[{RI}]))",
                 "{{source}} {{result}}"),
               q("sum by (source, operation) (rate(a3mailer_log_follow_errors_total{<<sel>>}"
                 f"[{RI}]))", "error {{source}} {{operation}}"))),
        Panel("Stalwart poll", "timeseries", "s",
              "How long the last poll of Stalwart's metrics took, and series it dropped.",
              (q("a3mailer_stalwart_scrape_duration_seconds{<<sel>>}", ON),)),
        Panel("Stalwart series dropped", "timeseries", "short",
              "Stalwart series left out of the last poll, by reason.",
              (q("a3mailer_stalwart_dropped_series{<<sel>>}", "{{instance}} {{reason}}"),)),
        Panel("Custom metric rejections", "timeseries", "ops",
              "Custom metric updates refused per second, by metric and reason.",
              (q("sum by (metric, reason) (rate(a3mailer_exporter_custom_metric_rejections_total"
                 f"{{<<sel>>}}[{RI}]))", "{{metric}} {{reason}}"),)),
    )),
]

EXPORTER_ROWS.append(Row("Alert engine", (
    Panel("Engine alerts", "timeseries", "short",
          "Threshold alerts firing and pending in the exporter's own engine (alerting.engine), "
          "evaluated like the Prometheus rules; GET /api/v1/alerts lists them.",
          (q("sum by (instance) (a3mailer_alert_active{<<sel>>})", "firing {{instance}}"),
           q("sum by (instance) (a3mailer_alert_pending{<<sel>>})", "pending {{instance}}"))),
    Panel("Engine alerts by name", "bargauge", "short",
          "Firing instances of each threshold alert in the engine, by severity.",
          (q("sum by (alert, severity) (a3mailer_alert_active{<<sel>>})",
             "{{alert}} ({{severity}})", instant=True),)),
    Panel("Engine evaluations", "timeseries", "s",
          "How long the engine's last evaluation took (reading the metrics included), and "
          "evaluations that failed per second.",
          (q("a3mailer_alert_evaluation_duration_seconds{<<sel>>}", "duration {{instance}}"),
           q(f"rate(a3mailer_alert_evaluation_failures_total{{<<sel>>}}[{RI}])",
             "failed {{instance}}"))),
    Panel("Alertmanager pushes", "timeseries", "ops",
          "The engine's pushes to alerting.engine.alertmanager.url per second, and failed "
          "ones by reason (A3MailerAlertPushFailing).",
          (q(f"sum by (instance) (rate(a3mailer_alert_pushes_total{{<<sel>>}}[{RI}]))",
             "pushes {{instance}}"),
           q("sum by (instance, reason) (rate(a3mailer_alert_push_failures_total{<<sel>>}"
             f"[{RI}]))", "failed {{instance}} {{reason}}")), width=24),
)))

DASHBOARDS: list[Dashboard] = [
    Dashboard("overview", "A3Mailer / Overview",
              "Health, firing alerts and the key indicators of every selected exporter.",
              OVERVIEW_ROWS),
    Dashboard("system", "A3Mailer / System",
              "The mail hosts: CPU, memory, filesystems, disk and network I/O, TCP.",
              SYSTEM_ROWS),
    Dashboard("mail", "A3Mailer / Mail services",
              "Protocol probes, TLS certificates, the delivery round trip, mail queues, mail "
              "DNS and DNSBL checks, A3Mailer/Stalwart and the mail logs.", MAIL_ROWS),
    Dashboard("security", "A3Mailer / Security",
              "The login-security engine: attempts, decisions, lockouts, bans, rate limiting, "
              "front ends, store and audit log.", SECURITY_ROWS),
    Dashboard("performance", "A3Mailer / Performance and tracing",
              "Latency of the exporter's API, of security decisions and of the mail server; "
              "the performance monitor's windows per path; span export.", PERFORMANCE_ROWS),
    Dashboard("exporter", "A3Mailer / Exporter",
              "The exporter itself: process, scrape, collectors, its sources and its alert "
              "engine.",
              EXPORTER_ROWS),
]
KEYS = tuple(d.key for d in DASHBOARDS)


# --------------------------------------------------------------------------- building


def slug(title: str) -> str:
    """Grafana's URL slug of a title."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def uid(config: Config, key: str) -> str:
    return str(config["dashboards"]["uids"].get(key, f"a3mailer-{key}"))


def identity(config: Config, key: str) -> dict[str, str]:
    """uid and slug of a dashboard, for the alerts' dashboard_url."""
    board = next(d for d in DASHBOARDS if d.key == key) if key in KEYS else None
    return {"uid": uid(config, key), "slug": slug(board.title) if board else key}


def referenced_series(text: str) -> set[str]:
    """Series names used by the queries of a generated dashboard JSON."""
    names: set[str] = set()
    for panel in json.loads(text)["panels"]:
        for target in panel.get("targets", []):
            names |= promql.metric_names(target["expr"])
    return names
