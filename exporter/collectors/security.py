"""The security engine's counters as catalogued metrics (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.instruments import CounterVec
from security.engine import AUDIT_FAILURES, LATENCY_BUCKETS, SecurityManager
from security.protocols.postfix import PostfixPolicyServer


class SecurityCollector:
    name = "security"

    def __init__(self, engine: SecurityManager, audit: Any, frontends: CounterVec,
                 postfix: PostfixPolicyServer | None = None):
        self.engine = engine
        self.audit = audit
        self.frontends = frontends
        self.postfix = postfix

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        yield _counter("a3mailer_security_attempts_total", stats.attempts)
        yield _counter("a3mailer_security_decisions_total", stats.decisions)
        latency = catalogue.family("a3mailer_security_decision_duration_seconds")
        running, buckets = 0.0, []
        for bound, count in zip([*map(repr, LATENCY_BUCKETS), "+Inf"], stats.latency_counts,
                                strict=True):
            running += count
            buckets.append((bound, running))
        latency.add_metric([], buckets, stats.latency_sum)
        yield latency
        yield _gauge("a3mailer_security_active_lockouts", stats.active_locks)
        yield _gauge("a3mailer_security_active_bans", stats.active_bans)
        yield _counter("a3mailer_security_store_errors_total",
                       {(k,): v for k, v in stats.store_errors.items()})
        yield catalogue.single("a3mailer_security_fail_open_decisions_total", stats.fail_open)
        yield catalogue.single("a3mailer_security_tracked_keys", self.engine.store.tracked_keys())
        counts = getattr(self.audit, "counts_by_type", {}) if self.audit is not None else {}
        yield _counter("a3mailer_security_audit_events_total",
                       {(k,): v for k, v in dict(counts).items()})
        if self.audit is not None:
            yield catalogue.single("a3mailer_security_audit_write_errors_total",
                                   AUDIT_FAILURES.failed)
        verified = getattr(self.audit, "last_verify_ok", None)
        if verified is not None:
            yield catalogue.single("a3mailer_security_audit_chain_ok", 1.0 if verified else 0.0)
        yield from self.frontends.collect()
        if self.postfix is not None and self.postfix.stats.connections:
            postfix = self.postfix.stats
            yield _counter("a3mailer_security_postfix_requests_total",
                           {(k,): v for k, v in postfix.requests.items()})
            yield _counter("a3mailer_security_postfix_errors_total",
                           {(k,): v for k, v in postfix.errors.items()})
            yield catalogue.single("a3mailer_security_postfix_connections", postfix.active)


def _counter(name: str, table: dict[Any, float]) -> Metric:
    fam = catalogue.family(name)
    for labels, value in tuple(table.items()):
        fam.add_metric(list(labels), value)
    return fam


def _gauge(name: str, table: dict[str, int]) -> Metric:
    fam = catalogue.family(name)
    for label, value in tuple(table.items()):
        fam.add_metric([label], value)
    return fam
