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
    _spec("a3mailer_exporter_asyncio_tasks", "gauge", "",
          "asyncio tasks alive in the exporter's event loop: steady under steady load; a "
          "rise that never falls back is a leak.", (), "exporter"),
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
    _spec("a3mailer_security_audit_write_errors_total", "counter", "",
          "Audit records the audit log could not write (a full disk) since start; the "
          "operation they recorded went on.", (), "security"),
    _spec("a3mailer_security_rate_limited_total", "counter", "",
          "JSON API requests refused with 429, by client class (authenticated, anonymous, "
          "apikey).",
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
          "unauthorized, store_unavailable).", ("frontend", "outcome"), "security"),
    # --- MFA (security/mfa/)
    _spec("a3mailer_mfa_verifications_total", "counter", "",
          "Second-factor verifications by method (totp, recovery, email, sms, webauthn) and "
          "result (success, invalid, replayed, expired, no_code, too_many_attempts, "
          "rate_limited, locked, not_enrolled, no_challenge, cloned).", ("method", "result"),
          "mfa"),
    _spec("a3mailer_mfa_enrollments_total", "counter", "",
          "Second-factor enrolment changes by method (totp, webauthn) and action (enroll, "
          "confirm, remove).", ("method", "action"), "mfa"),
    _spec("a3mailer_mfa_code_deliveries_total", "counter", "",
          "One-time code sends by channel (email, sms) and result (sent, failed, rejected, "
          "circuit_open, rate_limited, destination_limited, bad_destination).",
          ("channel", "result"), "mfa"),
    _spec("a3mailer_mfa_sms_circuit_open", "gauge", "",
          "1 while the SMS provider's circuit breaker is open or half-open (sends fail at "
          "once), 0 while closed; present when SMS codes are enabled.", (), "mfa"),
    # --- identity (API keys, sessions, CSRF, passwords, OIDC, SAML; exporter/identity.py)
    _spec("a3mailer_identity_verifications_total", "counter", "",
          "Credential verifications by method (apikey, session, csrf, oidc, introspection, "
          "saml) and result (success, failure).", ("method", "result"), "identity"),
    _spec("a3mailer_identity_verification_failures_total", "counter", "",
          "Failed verifications by method and reason (e.g. wrong, unknown, revoked, expired, "
          "rate_limited, bad_signature, wrong_audience, replayed).", ("method", "reason"),
          "identity"),
    _spec("a3mailer_identity_active_sessions", "gauge", "",
          "Live web sessions (recounted every session_config.cleanup_interval and on every "
          "change made through this process).", (), "identity"),
    _spec("a3mailer_identity_active_api_keys", "gauge", "",
          "API keys neither expired nor revoked: one drops out at its expiry or revocation; "
          "keys written by another replica count from this one's next listing or cleanup.",
          (), "identity"),
    _spec("a3mailer_identity_csrf_failures_total", "counter", "",
          "CSRF tokens refused, by reason (malformed, bad_mac, expired, no_session).",
          ("reason",), "identity"),
    _spec("a3mailer_identity_password_rejections_total", "counter", "",
          "Password-policy rule violations, by reason (too_short, blocklisted, context, "
          "too_weak, reused, ...); one rejected password may count under several.",
          ("reason",), "identity"),
    # --- probes and delivery round trip (exporter/probes/)
    _spec("a3mailer_probe_success", "gauge", "",
          "1 when the probe's last scheduled run succeeded, 0 when it failed (the reason is on "
          "/health); absent before the first run.", ("probe", "protocol"), "probes"),
    _spec("a3mailer_probe_duration_seconds", "gauge", "seconds",
          "Seconds each phase took in the probe's last scheduled run: connect, tls (STARTTLS "
          "included), banner, auth, select (IMAP), response (HTTP), total.",
          ("probe", "protocol", "phase"), "probes"),
    _spec("a3mailer_tls_cert_not_after_timestamp_seconds", "gauge", "seconds",
          "Unix time the server certificate expires (notAfter), read in the probe's last "
          "scheduled run, whether it verified or not.", ("probe",), "probes"),
    _spec("a3mailer_probe_tls_version_info", "gauge", "",
          "Always 1; the version label is the TLS version negotiated in the probe's last "
          "scheduled run.", ("probe", "version"), "probes"),
    _spec("a3mailer_probe_tls_verified", "gauge", "",
          "1 when the certificate chain and name verified (system CAs, or the probe's ca_file) "
          "in the probe's last scheduled run, 0 when not.", ("probe",), "probes"),
    _spec("a3mailer_probe_http_status_code", "gauge", "",
          "HTTP status code answered in the probe's last scheduled run.", ("probe",), "probes"),
    _spec("a3mailer_delivery_roundtrip_seconds", "histogram", "seconds",
          "Seconds from the submission server accepting the tagged message to its appearing in "
          "the IMAP mailbox, over the successful scheduled runs since start.", (), "delivery"),
    _spec("a3mailer_delivery_roundtrip_last_seconds", "gauge", "seconds",
          "The round trip of the last scheduled run, in seconds; absent when that run failed.",
          (), "delivery"),
    _spec("a3mailer_delivery_roundtrip_success", "gauge", "",
          "1 when the message of the last scheduled round trip arrived within "
          "monitoring.delivery.timeout, 0 when it did not or the run failed.", (), "delivery"),
    _spec("a3mailer_delivery_roundtrip_pending_messages", "gauge", "",
          "Round-trip messages of earlier scheduled runs that have not arrived yet; each is "
          "deleted when it does (within monitoring.delivery.cleanup_window).", (), "delivery"),
    # --- mail DNS and DNSBL checks (exporter/probes/dns.py, dnsbl.py)
    _spec("a3mailer_dns_check_success", "gauge", "",
          "1 when the mail DNS check (mx, spf, dmarc, dkim, mta_sts, tlsa, fcrdns) of the "
          "configured domain passed at the last scheduled run (monitoring.dns.interval), 0 "
          "when it failed; the reason is in /health. Absent before the first run.",
          ("domain", "check"), "dns"),
    _spec("a3mailer_dns_dmarc_policy", "gauge", "",
          "State set: 1 for the domain's DMARC p= policy (none, quarantine, reject) at the last "
          "scheduled run, 0 for the others; all 0 when the record is missing or invalid.",
          ("domain", "policy"), "dns"),
    _spec("a3mailer_dns_mta_sts_mode", "gauge", "",
          "State set: 1 for the mode (enforce, testing, none) of the domain's MTA-STS policy "
          "fetched at the last scheduled run, 0 for the others; all 0 when it could not be "
          "fetched or parsed.", ("domain", "mode"), "dns"),
    _spec("a3mailer_dns_dkim_success", "gauge", "",
          "1 when a usable DKIM key was published for the configured selector at the last "
          "scheduled run, 0 when it was missing, revoked or invalid.",
          ("domain", "selector"), "dns"),
    _spec("a3mailer_dns_spf_lookups", "gauge", "",
          "DNS-querying SPF terms (include, a, mx, ptr, exists, redirect, counting included "
          "records) at the last scheduled run; receivers fail SPF above 10 (11 means more).",
          ("domain",), "dns"),
    _spec("a3mailer_dns_check_duration_seconds", "gauge", "seconds",
          "How long the domain's mail DNS checks took at the last scheduled run.",
          ("domain",), "dns"),
    _spec("a3mailer_dns_last_run_timestamp_seconds", "gauge", "seconds",
          "Unix time the last scheduled mail DNS run finished.", (), "dns"),
    _spec("a3mailer_dnsbl_listed", "gauge", "",
          "1 when at least one IP of the configured set was listed by the DNSBL zone at the "
          "last scheduled run (monitoring.dnsbl.interval), 0 otherwise.",
          ("ip_set", "zone"), "dnsbl"),
    _spec("a3mailer_dnsbl_listed_ips", "gauge", "",
          "How many IPs of the configured set the DNSBL zone listed at the last scheduled run.",
          ("ip_set", "zone"), "dnsbl"),
    _spec("a3mailer_dnsbl_check_success", "gauge", "",
          "1 when every query of the set against the zone got a definite answer at the last "
          "scheduled run (and the zone passed its RFC 5782 test points), 0 on timeouts, "
          "refused queries (127.255.255.x) or unexpected answers; the reason is in /health.",
          ("ip_set", "zone"), "dnsbl"),
    _spec("a3mailer_dnsbl_last_run_timestamp_seconds", "gauge", "seconds",
          "Unix time the last scheduled DNSBL run finished.", (), "dnsbl"),
    # --- mail queues and Stalwart metrics (exporter/collectors/queues.py, stalwart.py)
    _spec("a3mailer_queue_messages", "gauge", "",
          "Messages in the mail queue, by queue: Postfix's active, deferred, hold, incoming "
          "and maildrop (all five, 0 when empty) and stalwart (A3Mailer's whole queue). As of "
          "the last check, every monitoring.queues.<source>.interval.", ("queue",), "queues"),
    _spec("a3mailer_queue_size_bytes", "gauge", "bytes",
          "Total size of the messages in the Postfix queue, as of the last check.",
          ("queue",), "queues"),
    _spec("a3mailer_queue_recipients", "gauge", "",
          "Recipients still to be delivered in the Postfix queue, as of the last check.",
          ("queue",), "queues"),
    _spec("a3mailer_queue_oldest_message_age_seconds", "gauge", "seconds",
          "Age of the oldest message in the Postfix queue (0 when empty), as of the last "
          "check.", ("queue",), "queues"),
    _spec("a3mailer_queue_message_age_seconds", "histogram", "seconds",
          "Ages of the messages in the Postfix queue (now - arrival time), as of the last "
          "check: a snapshot, not a stream of observations.", ("queue",), "queues"),
    _spec("a3mailer_queue_message_size_bytes", "histogram", "bytes",
          "Sizes of the messages in the Postfix queue, as of the last check: a snapshot, not "
          "a stream of observations.", ("queue",), "queues"),
    _spec("a3mailer_queue_total_messages", "gauge", "",
          "Messages in all queues of every source checked successfully; compared with "
          "monitoring.alert_thresholds.queue_size_threshold.", (), "queues"),
    _spec("a3mailer_queue_check_success", "gauge", "",
          "1 when the last queue check of the source (postfix, stalwart) succeeded, 0 when it "
          "failed or its output was incomplete (the reason is in /health).", ("source",),
          "queues"),
    _spec("a3mailer_queue_check_duration_seconds", "gauge", "seconds",
          "How long the last queue check of the source took.", ("source",), "queues"),
    _spec("a3mailer_stalwart_up", "gauge", "",
          "1 when the last poll of Stalwart's /metrics/prometheus succeeded (every "
          "monitoring.stalwart.interval), 0 when it failed (the reason is logged).", (),
          "stalwart"),
    _spec("a3mailer_stalwart_scrape_duration_seconds", "gauge", "seconds",
          "How long the last poll of Stalwart's /metrics/prometheus took.", (), "stalwart"),
    _spec("a3mailer_stalwart_dropped_series", "gauge", "",
          "Stalwart series left out of the last poll, by reason: labelled, unsupported_type, "
          "name_conflict, max_series (beyond monitoring.stalwart.max_series).", ("reason",),
          "stalwart"),
    *(_spec(f"a3mailer_stalwart_{event.replace('.', '_').replace('-', '_')}_total", "counter",
            "", f"Stalwart's {event} events: {text}. Re-exported every "
            "monitoring.stalwart.interval; 0 until the first event.", (), "stalwart")
      for event, text in (
          ("auth.success", "successful authentications"),
          ("auth.failed", "failed authentications"),
          ("auth.too-many-attempts", "authentications refused after too many attempts"),
          ("auth.error", "authentication errors"),
          ("security.authentication-ban", "IP addresses banned for failed authentications"),
          ("security.abuse-ban", "IP addresses banned for abuse"),
          ("security.scan-ban", "IP addresses banned for scanning"),
          ("security.loiter-ban", "IP addresses banned for loitering"),
          ("security.ip-blocked", "connections refused from a blocked IP address"),
          ("security.unauthorized", "unauthorized accesses"),
          ("smtp.connection-start", "SMTP connections opened"),
          ("smtp.connection-end", "SMTP connections closed"),
          ("imap.connection-start", "IMAP connections opened"),
          ("imap.connection-end", "IMAP connections closed"),
          ("pop3.connection-start", "POP3 connections opened"),
          ("pop3.connection-end", "POP3 connections closed"),
          ("http.connection-start", "HTTP connections opened"),
          ("delivery.attempt-start", "delivery attempts started"),
          ("delivery.completed", "deliveries completed (every recipient done)"),
          ("delivery.delivered", "messages delivered to a remote server"),
          ("delivery.message-rejected", "messages rejected by the remote server"),
          ("delivery.rcpt-to-rejected", "recipients rejected by the remote server"),
          ("delivery.rcpt-to-failed", "recipients that failed temporarily"),
          ("delivery.dsn-success", "success notifications (DSN) sent"),
          ("delivery.dsn-temp-fail", "delay notifications (DSN) sent"),
          ("delivery.dsn-perm-fail", "bounces (DSN) sent"),
          ("delivery.double-bounce", "messages discarded after a double bounce"),
          ("queue.queue-message", "messages queued for delivery"),
          ("queue.queue-message-authenticated", "messages queued from authenticated senders"),
          ("queue.queue-dsn", "notifications (DSN) queued"),
          ("queue.queue-report", "reports queued"),
          ("queue.rescheduled", "deliveries rescheduled after a temporary failure"),
      )),
    *(_spec(f"a3mailer_stalwart_{name}", type_, unit,
            f"Stalwart's {event} {type_}: {text}. Re-exported every monitoring.stalwart.interval"
            + ("; 0 until the first event." if type_ == "gauge" and name.endswith(
                ("_connections", "queue_count")) else "." if type_ == "gauge" else
               (", milliseconds converted to seconds" if unit == "seconds" else "")
               + "; only _sum, _count and the +Inf bucket while Stalwart's buckets are not "
               "cumulative counts; empty until the first event."), (), "stalwart")
      for name, event, type_, unit, text in (
          ("server_memory_bytes", "server.memory", "gauge", "bytes", "memory in use"),
          ("user_count", "user.count", "gauge", "", "accounts (enterprise edition)"),
          ("domain_count", "domain.count", "gauge", "", "domains (enterprise edition)"),
          ("queue_count", "queue.count", "gauge", "", "messages in the queue"),
          ("http_active_connections", "http.active-connections", "gauge", "",
           "open HTTP connections"),
          ("imap_active_connections", "imap.active-connections", "gauge", "",
           "open IMAP connections"),
          ("pop3_active_connections", "pop3.active-connections", "gauge", "",
           "open POP3 connections"),
          ("smtp_active_connections", "smtp.active-connections", "gauge", "",
           "open SMTP connections"),
          ("sieve_active_connections", "sieve.active-connections", "gauge", "",
           "open ManageSieve connections"),
          ("delivery_active_connections", "delivery.active-connections", "gauge", "",
           "open outgoing delivery connections"),
          ("delivery_total_time_seconds", "delivery.total-time", "histogram", "seconds",
           "time from submission to delivery"),
          ("delivery_attempt_time_seconds", "delivery.attempt-time", "histogram", "seconds",
           "duration of one delivery attempt"),
          ("smtp_request_time_seconds", "smtp.request-time", "histogram", "seconds",
           "SMTP request duration"),
          ("imap_request_time_seconds", "imap.request-time", "histogram", "seconds",
           "IMAP request duration"),
          ("pop3_request_time_seconds", "pop3.request-time", "histogram", "seconds",
           "POP3 request duration"),
          ("http_request_time_seconds", "http.request-time", "histogram", "seconds",
           "HTTP (JMAP, management API) request duration"),
          ("sieve_request_time_seconds", "sieve.request-time", "histogram", "seconds",
           "ManageSieve request duration"),
          ("store_data_read_time_seconds", "store.data-read-time", "histogram", "seconds",
           "data store read time"),
          ("store_data_write_time_seconds", "store.data-write-time", "histogram", "seconds",
           "data store write time"),
          ("message_size_bytes", "message.size", "histogram", "bytes",
           "size of received messages"),
          ("message_authenticated_size_bytes", "message.authenticated-size", "histogram",
           "bytes", "size of messages received from authenticated senders"),
      )),
    # --- log ingestion (exporter/collectors/logs.py)
    _spec("a3mailer_log_lines_total", "counter", "",
          "Log lines read, by configured file (source) and result: parsed (counted as an "
          "event), ignored (a known daemon's line that is not counted), unparsed (malformed).",
          ("source", "result"), "logs"),
    _spec("a3mailer_mail_deliveries_total", "counter", "",
          "Delivery attempts per recipient found in the log, by status (sent, deferred, "
          "bounced, expired).", ("source", "status"), "logs"),
    _spec("a3mailer_mail_rejects_total", "counter", "",
          "SMTP rejections found in the log, by reply class (4xx, 5xx) and stage (connect, "
          "helo, mail, rcpt, data, end-of-message, header, body, ...).",
          ("source", "class", "stage"), "logs"),
    _spec("a3mailer_auth_events_total", "counter", "",
          "Logins found in the log (SMTP AUTH, IMAP, POP3, ...), by service and result "
          "(success, failure).", ("source", "service", "result"), "logs"),
    _spec("a3mailer_tls_failures_total", "counter", "",
          "Failed TLS handshakes found in the log, by service (smtp_client: outgoing "
          "deliveries).", ("source", "service"), "logs"),
    _spec("a3mailer_log_follow_errors_total", "counter", "",
          "Log ingestion failures, by operation: read (file missing or unreadable, counted "
          "per poll), state (offset not saved), report (the security engine refused an event).",
          ("source", "operation"), "logs"),
    _spec("a3mailer_log_rotations_total", "counter", "",
          "Log file rotations noticed, by kind: rename (a new file at the path) or truncate "
          "(truncated or replaced in place).", ("source", "kind"), "logs"),
    _spec("a3mailer_log_offset_bytes", "gauge", "bytes",
          "Read position in the current log file (saved in the state directory).",
          ("source",), "logs"),
    # --- health engine
    _spec("a3mailer_health_status", "gauge", "",
          "State set: 1 for the component's current status (healthy, degraded, unhealthy, "
          "unknown), 0 for the others.", ("component", "status"), "health"),
    _spec("a3mailer_health_check_duration_seconds", "gauge", "seconds",
          "How long the component's last health check took.", ("component",), "health"),
    _spec("a3mailer_health_check_timestamp_seconds", "gauge", "seconds",
          "Unix time of the component's last health check.", ("component",), "health"),
    # --- performance and tracing (exporter/performance.py, exporter/tracing.py)
    _spec("a3mailer_performance_operations_per_second", "gauge", "",
          "Operations per second over the sliding window (1m, 5m, 15m), by path (http, "
          "security, store, collector, schedule).", ("path", "window"), "performance"),
    _spec("a3mailer_performance_error_ratio", "gauge", "ratio",
          "Share of the path's operations in the sliding window that failed (HTTP 5xx, "
          "exceptions, timeouts, security store unavailable).", ("path", "window"),
          "performance"),
    _spec("a3mailer_performance_latency_seconds", "gauge", "seconds",
          "Latency percentile (50, 95, 99) of the path's operations over the sliding "
          "window, within 2% relative error; absent while the window is empty.",
          ("path", "window", "percentile"), "performance"),
    _spec("a3mailer_security_store_operation_duration_seconds", "histogram", "seconds",
          "Security store call latency, by store method (span store <method>).",
          ("operation",), "performance"),
    _spec("a3mailer_exporter_collector_run_duration_seconds", "histogram", "seconds",
          "Collector run latency over all scrapes (span collector <name>).", ("collector",),
          "performance"),
    _spec("a3mailer_exporter_schedule_run_duration_seconds", "histogram", "seconds",
          "Latency of each scheduled run (probes as probe-<name>, delivery-roundtrip, dns, "
          "dnsbl, queue-*, stalwart, alerts), a timeout included (span of the same name).",
          ("schedule",), "performance"),
    _spec("a3mailer_tracing_sampling_ratio", "gauge", "ratio",
          "Share of new traces sampled (tracing.sampling_rate); 0 when tracing is disabled.",
          (), "tracing"),
    _spec("a3mailer_tracing_spans_exported_total", "counter", "",
          "Sampled spans the OTLP receiver accepted.", (), "tracing"),
    _spec("a3mailer_tracing_spans_dropped_total", "counter", "",
          "Sampled spans dropped, by reason: queue_full (the export queue was full, e.g. "
          "while the receiver is unreachable) or export_failed (the receiver refused or "
          "could not be reached within the export timeout).", ("reason",), "tracing"),
    _spec("a3mailer_tracing_queue_spans", "gauge", "",
          "Sampled spans waiting in the batch queue for export.", (), "tracing"),
    # --- threshold alert engine (exporter/alerts.py, exporter/alert_push.py)
    _spec("a3mailer_alert_active", "gauge", "",
          "Firing instances of the threshold alert, as the in-process engine evaluates it "
          "(alerting.engine); 0 while none fires.", ("alert", "severity"), "alerts"),
    _spec("a3mailer_alert_pending", "gauge", "",
          "Instances of the threshold alert whose condition holds but not yet for its `for`.",
          ("alert", "severity"), "alerts"),
    _spec("a3mailer_alert_evaluations_total", "counter", "",
          "Evaluations of the threshold alerts by the in-process engine.", (), "alerts"),
    _spec("a3mailer_alert_evaluation_failures_total", "counter", "",
          "Engine evaluations that raised (the exporter's log says why); the alerts kept "
          "their states.", (), "alerts"),
    _spec("a3mailer_alert_evaluation_duration_seconds", "gauge", "seconds",
          "How long the engine's last evaluation took, reading the metrics included.", (),
          "alerts"),
    _spec("a3mailer_alert_pushes_total", "counter", "",
          "Pushes of alerts to Alertmanager (POST /api/v2/alerts); only with "
          "alerting.engine.alertmanager.url.", (), "alerts"),
    _spec("a3mailer_alert_push_failures_total", "counter", "",
          "Pushes to Alertmanager that failed, by reason: timeout, unreachable (connection "
          "refused, DNS, TLS) or rejected (a non-2xx answer).", ("reason",), "alerts"),
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
