"""MFA settings in plain numbers, built from the `security.mfa` config section."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from security.mfa.totp import TotpParams
from security.ratelimit import Limit


@dataclass(frozen=True)
class WebAuthnSettings:
    rp_id: str = "localhost"
    rp_name: str = "A3Mailer"
    origins: tuple[str, ...] = ("https://localhost",)
    attestation: str = "none"  # the preference sent to the browser: none | direct
    formats: tuple[str, ...] = ("none", "packed")
    user_verification: str = "preferred"  # required | preferred | discouraged
    challenge_timeout: float = 120.0
    attestation_roots: tuple[bytes, ...] = ()  # PEM roots a packed x5c chain must reach


@dataclass(frozen=True)
class Policy:
    """When a login needs a second factor (point 11 of the engine's decisions)."""

    on_new_device: bool = True
    on_new_source: bool = True
    risky_networks: tuple[str, ...] = ()
    risky_source_failures: int = 3
    remember_for: float = 30 * 86400.0
    max_remembered: int = 20  # devices and networks per user; the oldest go first
    dovecot_action: str = "allow"  # allow | reject: Dovecot cannot ask for a second factor
    message: str = "Second factor required"


@dataclass(frozen=True)
class MfaSettings:
    issuer: str = "A3Mailer"
    totp: TotpParams = field(default_factory=TotpParams)
    secret_bytes: int = 20
    skew_steps: int = 1
    recovery_codes: int = 10
    verify_limit: Limit = field(default_factory=lambda: Limit(5, 60.0, 4))
    send_limit: Limit = field(default_factory=lambda: Limit(1, 30.0, 2))
    destination_limit: Limit = field(default_factory=lambda: Limit(5, 3600.0, 4))
    max_failures: int = 10
    failure_window: float = 900.0
    code_digits: int = 6
    code_lifetime: float = 600.0
    code_max_attempts: int = 5
    webauthn: WebAuthnSettings = field(default_factory=WebAuthnSettings)
    policy: Policy = field(default_factory=Policy)

    @classmethod
    def from_config(cls, section: dict[str, Any], seconds: Callable[[str], float],
                    attestation_roots: tuple[bytes, ...] = ()) -> MfaSettings:
        totp, codes, wa, policy = (section["totp"], section["codes"], section["webauthn"],
                                   section["policy"])
        return cls(
            issuer=section["issuer"],
            totp=TotpParams(totp["digits"], totp["period"], totp["algorithm"]),
            secret_bytes=totp["secret_bytes"],
            skew_steps=totp["skew_steps"],
            recovery_codes=totp["recovery_codes"],
            verify_limit=Limit(section["verify_rate"], seconds(section["verify_window"]),
                               section["verify_burst"]),
            send_limit=Limit(1, seconds(codes["resend_interval"]), codes["resend_burst"]),
            destination_limit=Limit(codes["destination_rate"],
                                    seconds(codes["destination_window"]),
                                    codes["destination_rate"] - 1),
            max_failures=section["max_failures"],
            failure_window=seconds(section["failure_window"]),
            code_digits=codes["digits"],
            code_lifetime=seconds(codes["lifetime"]),
            code_max_attempts=codes["max_attempts"],
            webauthn=WebAuthnSettings(
                rp_id=wa["rp_id"], rp_name=wa["rp_name"], origins=tuple(wa["origins"]),
                attestation=wa["attestation"], formats=tuple(wa["formats"]),
                user_verification=wa["user_verification"],
                challenge_timeout=seconds(wa["challenge_timeout"]),
                attestation_roots=attestation_roots),
            policy=Policy(
                on_new_device=policy["on_new_device"], on_new_source=policy["on_new_source"],
                risky_networks=tuple(policy["risky_networks"]),
                risky_source_failures=policy["risky_source_failures"],
                remember_for=seconds(policy["remember_for"]),
                max_remembered=policy["max_remembered"],
                dovecot_action=policy["dovecot_action"], message=policy["message"]),
        )
