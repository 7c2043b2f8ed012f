"""What the e-mail and SMS senders share: the error they raise and how messages are filled."""

from __future__ import annotations

import string
from typing import Protocol


class DeliveryError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # failed | rejected | circuit_open | bad_destination


class Sender(Protocol):
    channel: str

    def check(self, destination: str) -> None:
        """Raises DeliveryError("bad_destination") for what cannot be a destination."""
        ...

    async def send(self, destination: str, code: str, lifetime: float) -> None:
        """Delivers code; raises DeliveryError. The message never reaches a log."""
        ...


def fill(template: str, code: str, lifetime: float, **extra: str) -> str:
    """A message template with $code and $minutes (and extra names) filled in."""
    minutes = str(max(1, round(lifetime / 60)))
    return string.Template(template).safe_substitute(code=code, minutes=minutes, **extra)


def check_template(template: str, name: str) -> None:
    if "$code" not in template and "${code}" not in template:
        raise ValueError(f"{name} must contain $code")
