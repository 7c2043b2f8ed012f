"""Alertmanager's API v2 client of the alert engine: POST /api/v2/alerts, never blocking.

The engine hands over the alerts that need sending after each evaluation
(`submit`); one push runs at a time on the event loop, bounded by `timeout`, and
what arrives meanwhile waits for the next push (the newest state of each alert
wins, so the backlog is bounded by the number of alerts). A failed push is
counted by reason and logged once when pushes start failing and once when they
recover; the alerts in it are sent again at the engine's next resend, as
Prometheus's notifier does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from exporter import catalogue, tracing
from exporter.config import parse_duration, read_secret
from exporter.instruments import CounterVec

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

REASONS = ("timeout", "unreachable", "rejected")


@dataclass(frozen=True)
class PushSettings:
    url: str = ""
    timeout: float = 10.0
    resend_interval: float = 60.0
    authorization: str = ""  # the header value, from the secret files (never logged)
    ca_file: str = ""

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> PushSettings:
        authorization = ""
        token = read_secret(section, "bearer_token")
        password = read_secret(section, "password")
        if token:
            authorization = f"Bearer {token}"
        elif section["username"] and password is not None:
            pair = f"{section['username']}:{password}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(section["url"].rstrip("/"), parse_duration(section["timeout"]),
                   parse_duration(section["resend_interval"]), authorization,
                   section["ca_file"])

    def __repr__(self) -> str:  # the authorization header stays out of logs and tracebacks
        return f"PushSettings(url={self.url!r}, timeout={self.timeout})"


def _load_httpx(settings: PushSettings) -> None:
    """httpx (~5 MB resident, a few hundred ms to import) loads when a push URL is
    configured, at start or reload, not at the first push under load; never without one."""
    if settings.url:
        import httpx  # noqa: F401


class AlertPusher:
    def __init__(self, settings: PushSettings | None = None):
        self.settings = settings or PushSettings()
        _load_httpx(self.settings)
        self.pushes = 0
        self.failures = CounterVec("a3mailer_alert_push_failures_total")
        for reason in REASONS:
            self.failures.inc((reason,), 0.0)
        self.last_success = 0.0
        self.last_error = ""
        self._pending: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._failing = False

    @property
    def failed(self) -> int:
        return int(sum(self.failures.value((reason,)) for reason in REASONS))

    @property
    def enabled(self) -> bool:
        return bool(self.settings.url)

    def configure(self, settings: PushSettings) -> None:
        if settings != self.settings:
            self.settings = settings
            _load_httpx(settings)
            old, self._client = self._client, None
            if old is not None:
                with contextlib.suppress(RuntimeError):  # no loop: nothing was sent with it
                    asyncio.get_running_loop().create_task(old.aclose())

    def submit(self, alerts: dict[str, dict[str, Any]]) -> None:
        """Queues the alerts (fingerprint -> API v2 alert) and starts a push if none runs."""
        if not self.enabled or not alerts:
            return
        self._pending.update(alerts)
        if self._task is None or self._task.done():
            self._task = tracing.detached_task(self._drain(), "alertmanager-push")

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = list(self._pending.values()), {}
            await self.push(batch)

    async def push(self, alerts: list[dict[str, Any]]) -> bool:
        """One POST of the alerts; True when Alertmanager accepted them."""
        import httpx

        self.pushes += 1
        settings = self.settings
        headers = {"authorization": settings.authorization} if settings.authorization else {}
        try:
            async with asyncio.timeout(settings.timeout):
                answer = await self._http().post(f"{settings.url}/api/v2/alerts", json=alerts,
                                                 headers=headers)
        except TimeoutError:
            return self._failed("timeout", f"no answer within {settings.timeout:g}s")
        except httpx.TimeoutException:
            return self._failed("timeout", f"no answer within {settings.timeout:g}s")
        except (httpx.HTTPError, OSError) as exc:
            return self._failed("unreachable", type(exc).__name__)
        if not 200 <= answer.status_code < 300:
            return self._failed("rejected", f"HTTP {answer.status_code}: "
                                            f"{answer.text[:200].strip()}")
        self.last_success, self.last_error = time.time(), ""
        if self._failing:
            self._failing = False
            log.info("alert push to Alertmanager recovered", extra={"url": settings.url})
        return True

    def _failed(self, reason: str, message: str) -> bool:
        self.failures.inc((reason,))
        self.last_error = f"{reason}: {message}"
        if not self._failing:
            self._failing = True
            log.warning("alert push to Alertmanager failing; evaluation goes on",
                        extra={"url": self.settings.url, "reason": reason, "error": message})
        return False

    def _http(self) -> httpx.AsyncClient:
        import httpx

        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.settings.ca_file:
                verify = ssl.create_default_context(cafile=self.settings.ca_file)
            self._client = httpx.AsyncClient(verify=verify, timeout=self.settings.timeout,
                                             follow_redirects=False, trust_env=False)
        return self._client

    async def stop(self, timeout: float = 5.0) -> None:
        """Lets the push in progress (the final resolved alerts, say) finish, briefly."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            self._task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def collect(self) -> Iterator[Metric]:
        yield catalogue.single("a3mailer_alert_pushes_total", float(self.pushes))
        yield from self.failures.collect()
