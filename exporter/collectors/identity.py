"""The identity services' counters and gauges as catalogued metrics (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from exporter import catalogue

if TYPE_CHECKING:
    from exporter.identity import IdentityServices


class IdentityCollector:
    name = "identity"

    def __init__(self, identity: IdentityServices):
        self.identity = identity

    def collect(self) -> Iterator[Metric]:
        stats = self.identity.stats
        yield _counter("a3mailer_identity_verifications_total", stats.verifications)
        yield _counter("a3mailer_identity_verification_failures_total", stats.failures)
        yield _counter("a3mailer_identity_csrf_failures_total",
                       {(k,): v for k, v in tuple(stats.csrf_failures.items())})
        yield _counter("a3mailer_identity_password_rejections_total",
                       {(k,): v for k, v in tuple(stats.password_rejections.items())})
        yield catalogue.single("a3mailer_identity_active_sessions",
                               self.identity.sessions.active)
        yield catalogue.single("a3mailer_identity_active_api_keys",
                               self.identity.apikeys.active)


def _counter(name: str, table: dict[Any, float]) -> Metric:
    fam = catalogue.family(name)
    for labels, value in tuple(table.items()):
        fam.add_metric(list(labels), value)
    return fam
