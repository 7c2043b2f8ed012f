"""SMS one-time codes through an HTTP provider webhook, with retries and a circuit breaker.

One POST per message to `url`, with the auth header from a secret file and a body made
from `body_template` ($phone, $code, $message, $minutes; values escaped for the content
type). 2xx is delivered; 408, 429, 5xx and connection errors are retried with doubling
backoff; other 4xx are the provider refusing this message (not retried, not counted
against it). After `failure_threshold` failed sends in a row the circuit opens: sends
fail at once for `reset_timeout`, then one trial send decides whether it closes again.
Redirects are not followed, so the auth header goes to the configured URL only.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from security import no_redirect
from security.mfa.delivery import DeliveryError, check_template, fill

_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")  # E.164
_RETRYABLE = {408, 425, 429}


@dataclass(frozen=True)
class SmsProvider:
    url: str = ""
    auth_header: str = "Authorization"
    auth_value: str | None = None
    content_type: str = "application/json"
    body_template: str = '{"to": "$phone", "text": "$message"}'
    message_template: str = "Your login code is $code (valid $minutes min)."
    timeout: float = 5.0
    retries: int = 2
    retry_backoff: float = 0.5
    failure_threshold: int = 5
    reset_timeout: float = 30.0


class CircuitBreaker:
    """closed (sending) -> open after `threshold` failures in a row (refusing) -> half-open
    after `reset_timeout` (one trial) -> closed on success, open again on failure."""

    def __init__(self, threshold: int, reset_timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold, self.reset_timeout, self.clock = threshold, reset_timeout, clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self._trial or self.clock() - self.opened_at >= self.reset_timeout:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial:
            self._trial = True
            return True
        return False

    def success(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        if self._trial or self.failures >= self.threshold:
            self.opened_at, self._trial = self.clock(), False


class SmsSender:
    channel = "sms"

    def __init__(self, provider: SmsProvider, sleep: Callable[[float], Any] = asyncio.sleep):
        if not provider.url.startswith(("http://", "https://")):
            raise ValueError("security.mfa.sms.url must be an http:// or https:// URL")
        check_template(provider.message_template, "security.mfa.sms.message_template")
        self.provider = provider
        self.breaker = CircuitBreaker(provider.failure_threshold, provider.reset_timeout)
        self._sleep = sleep

    def body(self, phone: str, code: str, lifetime: float) -> bytes:
        p = self.provider
        message = fill(p.message_template, code, lifetime)
        escape: Callable[[str], str] = str
        if "json" in p.content_type:
            def escape(value: str) -> str:
                return json.dumps(value)[1:-1]
        elif "x-www-form-urlencoded" in p.content_type:
            escape = urllib.parse.quote_plus
        return fill(p.body_template, escape(code), lifetime, phone=escape(phone),
                    message=escape(message)).encode("utf-8")

    def check(self, destination: str) -> None:
        if not _PHONE.fullmatch(destination):
            raise DeliveryError("bad_destination", "not an E.164 phone number (+<digits>)")

    async def send(self, destination: str, code: str, lifetime: float) -> None:
        self.check(destination)
        if not self.breaker.allow():
            raise DeliveryError("circuit_open", "SMS provider circuit open after repeated "
                                                "failures; retry later")
        body = self.body(destination, code, lifetime)
        problem = ""
        for attempt in range(self.provider.retries + 1):
            if attempt:
                await self._sleep(self.provider.retry_backoff * 2 ** (attempt - 1))
            try:
                status = await asyncio.to_thread(self._post, body)
            except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            if 200 <= status < 300:
                self.breaker.success()
                return
            problem = f"HTTP {status}"
            if 400 <= status < 500 and status not in _RETRYABLE:
                self.breaker.success()  # the provider answered: it is up
                raise DeliveryError("rejected", f"SMS provider refused the message: {problem}")
        self.breaker.failure()
        raise DeliveryError("failed", f"SMS provider unreachable after "
                                      f"{self.provider.retries + 1} tries: {problem}")

    def _post(self, body: bytes) -> int:
        p = self.provider
        headers = {"Content-Type": p.content_type, "User-Agent": "a3mailer-exporter"}
        if p.auth_value:
            headers[p.auth_header] = p.auth_value
        # the scheme is http(s), checked in __init__
        request = urllib.request.Request(p.url, data=body, headers=headers,  # noqa: S310
                                         method="POST")
        try:
            # p.timeout bounds the whole POST, not each read: a provider that dribbles its
            # answer does not hold the sender's thread
            with no_redirect.open_within(request, p.timeout) as response:
                response.read(65536)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)
