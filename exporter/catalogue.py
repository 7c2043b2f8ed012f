"""Every metric the exporter emits: name, type, unit, help and label names.

Collectors build their metric families from here (`family()`), so a name, HELP
text or label set exists once; the generators read the same table to write
docs/metrics.md, the dashboards and the alert rules. Names follow DESIGN.md:
prefix a3mailer_, base units, _total on counters, bounded labels only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str  # counter | gauge | histogram
    unit: str  # seconds | bytes | ratio | "" (a count or a state)
    help: str
    labels: tuple[str, ...] = ()
    source: str = ""  # the collector or engine that emits it


def _spec(name: str, type_: str, unit: str, help_: str, labels: tuple[str, ...] = (),
          source: str = "") -> MetricSpec:
    return MetricSpec(name, type_, unit, help_, labels, source)


_SPECS = [
    # --- the exporter itself
    _spec("a3mailer_exporter_build_info", "gauge", "",
          "Always 1; the labels say which exporter version and Python run.",
          ("version", "python_version"), "exporter"),
    _spec("a3mailer_exporter_collector_duration_seconds", "gauge", "seconds",
          "How long the collector took during this scrape.", ("collector",), "exporter"),
    _spec("a3mailer_exporter_collector_success", "gauge", "",
          "1 when the collector succeeded during this scrape, 0 when it raised.",
          ("collector",), "exporter"),
    _spec("a3mailer_exporter_config_last_reload_successful", "gauge", "",
          "1 when the last configuration (re)load succeeded, 0 when it was rejected "
          "and the previous configuration kept running.", (), "exporter"),
    _spec("a3mailer_exporter_config_last_reload_success_timestamp_seconds", "gauge", "seconds",
          "Unix time of the last successful configuration (re)load.", (), "exporter"),
    _spec("a3mailer_exporter_ready", "gauge", "",
          "1 when every critical health component is healthy (GET /readyz answers 200).",
          (), "exporter"),
    _spec("a3mailer_exporter_http_requests_total", "counter", "",
          "HTTP requests served, by route template and status code.",
          ("handler", "code"), "exporter"),
    _spec("a3mailer_exporter_http_request_duration_seconds", "histogram", "seconds",
          "HTTP request latency by route template.", ("handler",), "exporter"),
    _spec("a3mailer_exporter_custom_metric_rejections_total", "counter", "",
          "Custom metric updates refused, by declared metric and reason.",
          ("metric", "reason"), "exporter"),
    _spec("a3mailer_monitoring_history_entries", "gauge", "",
          "Snapshots held in the in-memory monitoring history.", (), "history"),
    # --- standard process metrics (the Prometheus client library convention, no prefix)
    _spec("process_cpu_seconds_total", "counter", "seconds",
          "Total user and system CPU time spent in seconds.", (), "process"),
    _spec("process_virtual_memory_bytes", "gauge", "bytes",
          "Virtual memory size in bytes.", (), "process"),
    _spec("process_resident_memory_bytes", "gauge", "bytes",
          "Resident memory size in bytes.", (), "process"),
    _spec("process_start_time_seconds", "gauge", "seconds",
          "Start time of the process since unix epoch in seconds.", (), "process"),
    _spec("process_open_fds", "gauge", "", "Number of open file descriptors.", (), "process"),
    _spec("process_max_fds", "gauge", "",
          "Maximum number of open file descriptors.", (), "process"),
    # --- the host (system collector)
    _spec("a3mailer_system_cpu_usage_ratio", "gauge", "ratio",
          "Share of all CPU time that was busy (not idle or iowait) since the previous scrape.",
          (), "system"),
    _spec("a3mailer_system_cpu_seconds_total", "counter", "seconds",
          "CPU time spent in each mode, summed over all CPUs.", ("mode",), "system"),
    _spec("a3mailer_system_cpus", "gauge", "", "Logical CPUs.", (), "system"),
    _spec("a3mailer_system_load1", "gauge", "", "1-minute load average.", (), "system"),
    _spec("a3mailer_system_load5", "gauge", "", "5-minute load average.", (), "system"),
    _spec("a3mailer_system_load15", "gauge", "", "15-minute load average.", (), "system"),
    _spec("a3mailer_system_memory_usage_ratio", "gauge", "ratio",
          "Share of memory in use (1 - available / total).", (), "system"),
    _spec("a3mailer_system_memory_total_bytes", "gauge", "bytes", "Total memory.", (), "system"),
    _spec("a3mailer_system_memory_available_bytes", "gauge", "bytes",
          "Memory available to new work without swapping.", (), "system"),
    _spec("a3mailer_system_memory_used_bytes", "gauge", "bytes",
          "Memory in use (total - available).", (), "system"),
    _spec("a3mailer_system_swap_total_bytes", "gauge", "bytes", "Total swap.", (), "system"),
    _spec("a3mailer_system_swap_used_bytes", "gauge", "bytes", "Swap in use.", (), "system"),
    _spec("a3mailer_system_disk_usage_ratio", "gauge", "ratio",
          "Share of the filesystem's space in use, as df counts it.", ("mountpoint",), "system"),
    _spec("a3mailer_system_disk_total_bytes", "gauge", "bytes",
          "Size of the filesystem.", ("mountpoint",), "system"),
    _spec("a3mailer_system_disk_free_bytes", "gauge", "bytes",
          "Space available to unprivileged users.", ("mountpoint",), "system"),
    _spec("a3mailer_system_disk_read_bytes_total", "counter", "bytes",
          "Bytes read from the block device.", ("device",), "system"),
    _spec("a3mailer_system_disk_written_bytes_total", "counter", "bytes",
          "Bytes written to the block device.", ("device",), "system"),
    _spec("a3mailer_system_disk_reads_completed_total", "counter", "",
          "Reads completed on the block device.", ("device",), "system"),
    _spec("a3mailer_system_disk_writes_completed_total", "counter", "",
          "Writes completed on the block device.", ("device",), "system"),
    _spec("a3mailer_system_disk_io_time_seconds_total", "counter", "seconds",
          "Time the block device spent doing I/O.", ("device",), "system"),
    _spec("a3mailer_system_network_receive_bytes_total", "counter", "bytes",
          "Bytes received on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_transmit_bytes_total", "counter", "bytes",
          "Bytes sent on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_receive_packets_total", "counter", "",
          "Packets received on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_transmit_packets_total", "counter", "",
          "Packets sent on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_receive_errors_total", "counter", "",
          "Receive errors on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_transmit_errors_total", "counter", "",
          "Transmit errors on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_receive_drops_total", "counter", "",
          "Received packets dropped on the network device.", ("device",), "system"),
    _spec("a3mailer_system_network_transmit_drops_total", "counter", "",
          "Outgoing packets dropped on the network device.", ("device",), "system"),
    _spec("a3mailer_system_tcp_connections", "gauge", "",
          "TCP sockets (IPv4 and IPv6) by state: established (the seed's active_connections) "
          "and time_wait, or every state with monitoring.system.tcp_state_detail.",
          ("state",), "system"),
    _spec("a3mailer_system_boot_time_seconds", "gauge", "seconds",
          "Unix time the host booted.", (), "system"),
    _spec("a3mailer_system_uptime_seconds", "gauge", "seconds",
          "Seconds since the host booted.", (), "system"),
    # --- security engine
    _spec("a3mailer_security_attempts_total", "counter", "",
          "Logins reported to the security engine, by protocol and result (success, failure).",
          ("protocol", "result"), "security"),
    _spec("a3mailer_security_decisions_total", "counter", "",
          "Login decisions by action (allow, delay, reject) and reason (ok, trusted, "
          "allowlisted, tarpit, banned, locked, account_locked, store_unavailable).",
          ("action", "reason"), "security"),
    _spec("a3mailer_security_decision_duration_seconds", "histogram", "seconds",
          "Time the engine took to decide, store calls included (HTTP excluded).", (),
          "security"),
    _spec("a3mailer_security_active_lockouts", "gauge", "",
          "Lockouts in force, by scope (source_account, account); recounted every 5 s and on "
          "every change.", ("scope",), "security"),
    _spec("a3mailer_security_active_bans", "gauge", "",
          "Banned networks, by how they were banned (manual, automatic, feed).", ("source",),
          "security"),
    _spec("a3mailer_security_store_errors_total", "counter", "",
          "Security store calls that failed, by engine operation.", ("operation",), "security"),
    _spec("a3mailer_security_fail_open_decisions_total", "counter", "",
          "Logins allowed because the store failed and security.store.fail_open is true.", (),
          "security"),
    _spec("a3mailer_security_tracked_keys", "gauge", "",
          "Failure-counter keys held in memory (capped by security.store.max_tracked_keys).",
          (), "security"),
    _spec("a3mailer_security_audit_events_total", "counter", "",
          "Audit records written since start, by type.", ("type",), "security"),
    _spec("a3mailer_security_rate_limited_total", "counter", "",
          "JSON API requests refused with 429, by client class (authenticated, anonymous).",
          ("class",), "security"),
    _spec("a3mailer_security_postfix_requests_total", "counter", "",
          "Postfix policy requests answered, by action (dunno, reject, defer); present once "
          "Postfix has connected.", ("action",), "security"),
    _spec("a3mailer_security_postfix_errors_total", "counter", "",
          "Postfix policy requests that were malformed, incomplete or failed, by reason.",
          ("reason",), "security"),
    _spec("a3mailer_security_postfix_connections", "gauge", "",
          "Open Postfix policy connections.", (), "security"),
    _spec("a3mailer_security_audit_chain_ok", "gauge", "",
          "1 when the audit log's hash chain verified at the last check (start-up, then "
          "hourly), 0 when it is broken; absent before the first check.", (), "security"),
    _spec("a3mailer_security_frontend_requests_total", "counter", "",
          "Requests to the security front ends, by front end and outcome (ok, bad_request, "
          "unauthorized).", ("frontend", "outcome"), "security"),
    # --- probes and delivery round trip (exporter/probes/)
    # --- mail DNS and DNSBL checks (exporter/probes/dns.py, dnsbl.py)
    # --- mail queues and Stalwart metrics (exporter/collectors/queues.py, stalwart.py)
    # --- log ingestion (exporter/collectors/logs.py)
    # --- health engine
    _spec("a3mailer_health_status", "gauge", "",
          "State set: 1 for the component's current status (healthy, degraded, unhealthy, "
          "unknown), 0 for the others.", ("component", "status"), "health"),
    _spec("a3mailer_health_check_duration_seconds", "gauge", "seconds",
          "How long the component's last health check took.", ("component",), "health"),
    _spec("a3mailer_health_check_timestamp_seconds", "gauge", "seconds",
          "Unix time of the component's last health check.", ("component",), "health"),
]

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}

CUSTOM_PREFIX = "a3mailer_custom_"


def custom_spec(name: str, type_: str, help_: str, labels: list[str]) -> MetricSpec:
    """The catalogue entry of a metric declared in monitoring.custom_metrics."""
    full = CUSTOM_PREFIX + name + ("_total" if type_ == "counter" else "")
    return MetricSpec(full, type_, "", help_, tuple(labels), "custom")


def family(name: str, spec: MetricSpec | None = None) -> Any:
    """An empty metric family for a catalogued metric; add samples with add_metric().

    Typed Any: the family classes' add_metric() signatures differ by type.
    """
    spec = spec or METRICS[name]
    if spec.type == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
    if spec.type == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def single(name: str, value: float) -> Metric:
    """A catalogued metric with no labels and one value."""
    fam = family(name)
    fam.add_metric([], value)
    return fam
