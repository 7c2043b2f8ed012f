"""Stalwart / A3Mailer webhooks: signed batches of events that feed the engine.

Stalwart POSTs `{"events": [{"id", "createdAt", "type", "data": {...}}]}` with
`X-Signature: base64(HMAC-SHA256(key, body))`. The signature is checked in
constant time before anything is parsed; an event id seen before, or an event
older than the replay window, is skipped, so a captured request replayed later
changes nothing; an event the engine has no use for (another type, no valid address)
is ignored. Stalwart sends no password hash, so each failure it reports counts as a
distinct wrong password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from security import strict_json
from security.attempts import Attempt, parse_ip


class WebhookError(ValueError):
    """A malformed batch: answered with 400."""


def signature(key: bytes, body: bytes) -> str:
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()


def signature_ok(key: bytes, body: bytes, header: str | None) -> bool:
    if not header:
        return False
    return hmac.compare_digest(signature(key, body).encode(), header.strip().encode())


@dataclass(frozen=True)
class Event:
    id: str
    created: float
    type: str
    data: dict[str, Any]

    def attempt(self) -> Attempt | None:
        """The login this event reports, if it names an account and a valid address."""
        login = _first(self.data, "accountName", "name", "login", "account")
        remote = _first(self.data, "remoteIp", "remote_ip", "ip")
        if not login or not remote:
            return None
        try:
            parse_ip(remote)
        except ValueError:
            return None
        protocol = _first(self.data, "protocol", "listenerProtocol") or "stalwart"
        return Attempt(login=login, remote_ip=remote, protocol=protocol)

    @property
    def remote_ip(self) -> str:
        return _first(self.data, "remoteIp", "remote_ip", "ip")

    def login(self) -> Attempt | None:
        """The login an auth.success or auth.failed event reports (None: nothing to report)."""
        return self.attempt() if self.type in ("auth.success", "auth.failed") else None

    def ban_address(self) -> str | None:
        """The address a security.*-ban event bans: one, never a network (0.0.0.0/0 refused
        every client); None when it names none."""
        if not (self.type.startswith("security.") and self.type.endswith("-ban")):
            return None
        try:
            return str(ipaddress.ip_address(self.remote_ip))
        except ValueError:
            return None


def _first(data: dict[str, Any], *names: str) -> str:
    for name in names:
        value = data.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def parse_batch(body: bytes) -> list[Event]:
    try:
        doc = strict_json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookError(f"body must be UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise WebhookError('body must be {"events": [...]}')
    events = []
    for index, raw in enumerate(doc["events"]):
        if not isinstance(raw, dict):
            raise WebhookError(f"events[{index}]: must be an object")
        event_id, kind, data = raw.get("id"), raw.get("type"), raw.get("data", {})
        if not isinstance(event_id, str) or not isinstance(kind, str) or not isinstance(
                data, dict):
            raise WebhookError(f"events[{index}]: id and type (strings) and data (object) "
                               "are required")
        if not event_id.strip():  # the replay guard keys on it: one would hide the next
            raise WebhookError(f"events[{index}].id: must not be empty")
        try:
            created = datetime.fromisoformat(str(raw.get("createdAt", "")).replace(
                "Z", "+00:00")).timestamp()
        except ValueError:
            raise WebhookError(f"events[{index}].createdAt: not an RFC 3339 time") from None
        events.append(Event(event_id, created, kind, data))
    return events


EVENT_KIND = "stalwart_event"  # the store's record of an event id taken, until its window ends


class ReplayGuard:
    """Remembers recent event ids (bounded) and the replay window, in this process: the
    store's records (EVENT_KIND) hold them across restarts and replicas."""

    def __init__(self, window: float, max_ids: int = 100_000):
        self.window = window
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()

    def fresh(self, event: Event, now: float) -> bool:
        """True the first time an event id is seen within the window."""
        if event.created < now - self.window or event.created > now + self.window:
            return False
        if event.id in self._seen:
            return False
        self._seen[event.id] = event.created
        while len(self._seen) > self.max_ids:
            self._seen.popitem(last=False)
        return True

    def forget(self, event_id: str) -> None:
        """An event fresh() let through was not taken after all (the store was away)."""
        self._seen.pop(event_id, None)
