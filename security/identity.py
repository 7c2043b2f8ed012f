"""What the identity parts (API keys, sessions, CSRF, passwords, OIDC, SAML, MFA) share:
their counters, and one way to audit a verification.

Counters are plain dicts the exporter turns into metrics at scrape time; their keys
are methods, results and reasons only, never a user name, address or token.
"""

from __future__ import annotations

from typing import Any

from security.engine import Auditor


class IdentityStats:
    def __init__(self) -> None:
        self.verifications: dict[tuple[str, str], float] = {}  # (method, success|failure)
        self.failures: dict[tuple[str, str], float] = {}  # (method, reason)
        self.csrf_failures: dict[str, float] = {}  # reason
        self.password_rejections: dict[str, float] = {}  # reason

    def verified(self, method: str, ok: bool, reason: str = "") -> None:
        key = (method, "success" if ok else "failure")
        self.verifications[key] = self.verifications.get(key, 0.0) + 1
        if not ok:
            self.failures[(method, reason)] = self.failures.get((method, reason), 0.0) + 1


def audit_verification(audit: Auditor | None, method: str, ok: bool, subject: str,
                       details: dict[str, Any] | None = None) -> None:
    """One auth.success / auth.failure record (the audit policy's flags decide)."""
    if audit is not None:
        audit.record("auth.success" if ok else "auth.failure", method, subject,
                     {"method": method, **(details or {})})
