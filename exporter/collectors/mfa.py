"""The MFA manager's counters as catalogued metrics (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.collectors.security import _counter
from security.mfa.manager import MfaManager


class MfaCollector:
    name = "mfa"

    def __init__(self, manager: MfaManager):
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        stats = self.manager.stats
        yield _counter("a3mailer_mfa_verifications_total", stats.verifications)
        yield _counter("a3mailer_mfa_enrollments_total", stats.enrollments)
        yield _counter("a3mailer_mfa_code_deliveries_total", stats.deliveries)
        sms: Any = self.manager.senders.get("sms")
        if sms is not None:
            yield catalogue.single("a3mailer_mfa_sms_circuit_open",
                                   0.0 if sms.breaker.state == "closed" else 1.0)

