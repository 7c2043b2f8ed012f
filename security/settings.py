"""The engine's settings, in plain numbers: built from the `security:` config section.

The exporter passes its duration parser in, so this library needs nothing from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Settings:
    max_login_attempts: int = 5
    login_attempt_window: float = 300.0
    lockout_duration: float = 900.0
    lockout_exponential: bool = True
    lockout_max_duration: float = 86400.0
    escalation_window: float = 86400.0
    account_lock_threshold: int = 50
    tarpit_enabled: bool = True
    tarpit_delay_per_failure: float = 1.0
    tarpit_max_delay: float = 5.0
    auto_ban_enabled: bool = True
    auto_ban_threshold: int = 20
    auto_ban_duration: float = 3600.0
    ipv6_prefix_length: int = 64
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    allowlist: tuple[str, ...] = ()
    fail_open: bool = True
    reject_message: str = "Authentication temporarily refused"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: dict[str, Any], seconds: Callable[[str], float]) -> Settings:
        lockout, tarpit, ban = section["lockout"], section["tarpit"], section["auto_ban"]
        return cls(
            max_login_attempts=section["max_login_attempts"],
            login_attempt_window=seconds(section["login_attempt_window"]),
            lockout_duration=seconds(section["lockout_duration"]),
            lockout_exponential=lockout["exponential"],
            lockout_max_duration=seconds(lockout["max_duration"]),
            escalation_window=seconds(lockout["escalation_window"]),
            account_lock_threshold=lockout["account_lock_threshold"],
            tarpit_enabled=tarpit["enabled"],
            tarpit_delay_per_failure=seconds(tarpit["delay_per_failure"]),
            tarpit_max_delay=seconds(tarpit["max_delay"]),
            auto_ban_enabled=ban["enabled"],
            auto_ban_threshold=ban["threshold"],
            auto_ban_duration=seconds(ban["duration"]),
            ipv6_prefix_length=section["ipv6_prefix_length"],
            trusted_networks=tuple(section["trusted_networks"]),
            allowlist=tuple(section["allowlist"]),
            fail_open=section["store"]["fail_open"],
            reject_message=section["reject_message"],
        )

    def lock_duration(self, level: int) -> float:
        """The lockout for the level-th offence within the escalation window."""
        if not self.lockout_exponential:
            return self.lockout_duration
        return min(self.lockout_max_duration, self.lockout_duration * 2 ** (level - 1))
