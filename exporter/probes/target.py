"""What a probe takes (a `Target` from monitoring.probes) and what it gives (a `ProbeResult`).

Kept apart from `exporter/probes/__init__.py` so the protocol modules can import
these types while the package's table of probers imports the protocol modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from exporter.config import parse_duration

PROTOCOLS = ("smtp", "imap", "pop3", "http")
TLS_MODES = ("none", "starttls", "implicit")

# Every phase a probe may time; bounded, so it can be a label value.
#   connect   TCP connect
#   tls       the TLS handshake (with STARTTLS: the STARTTLS command and the handshake)
#   banner    from connected (or TLS up, for implicit TLS) to the server's greeting
#   auth      AUTH (SMTP), LOGIN (IMAP), USER/PASS (POP3)
#   select    SELECT INBOX (IMAP, after a login)
#   response  from sending the HTTP request to the end of the response
#   total     the whole run, a second connection after a failed verification included
PHASES = ("connect", "tls", "banner", "auth", "select", "response", "total")

# Standard ports by (protocol, tls) when a target leaves `port` at 0.
DEFAULT_PORTS = {
    ("smtp", "none"): 25, ("smtp", "starttls"): 25, ("smtp", "implicit"): 465,
    ("imap", "none"): 143, ("imap", "starttls"): 143, ("imap", "implicit"): 993,
    ("pop3", "none"): 110, ("pop3", "starttls"): 110, ("pop3", "implicit"): 995,
    ("http", "none"): 80, ("http", "implicit"): 443,
}

# The defaults of a monitoring.probes item. The config loader merges defaults into
# mappings only, never into the items of a list, so they are applied here; they must
# equal the schema's (tests/unit/test_probes.py compares them once the schema has them).
TARGET_DEFAULTS: dict[str, Any] = {
    "port": 0,
    "tls": "none",
    "timeout": "10s",
    "interval": "1m",
    "credentials_file": "",
    "insecure_skip_verify": False,
    "ca_file": "",
    "server_name": "",
    "source_address": "",
    "ehlo": "a3mailer-exporter.invalid",
    "path": "/",
    "expect_status": [200],
}

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PATH = re.compile(r"/[!-~]*")  # an HTTP request target: visible ASCII, no space
# RFC 5321's EHLO argument: a domain, or an address literal in brackets
_EHLO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[!-Z^-~]{1,250}\]")


@dataclass(frozen=True)
class Target:
    """One monitoring.probes item, with its defaults applied and durations in seconds."""

    name: str
    protocol: str
    host: str
    port: int
    tls: str = "none"
    timeout: float = 10.0
    interval: float = 60.0
    credentials_file: str = ""
    insecure_skip_verify: bool = False
    ca_file: str = ""
    server_name: str = ""  # SNI and the name the certificate must match; empty: host
    source_address: str = ""  # local address to connect from; empty: the OS chooses
    ehlo: str = "a3mailer-exporter.invalid"  # SMTP only
    path: str = "/"  # HTTP only
    expect_status: tuple[int, ...] = (200,)  # HTTP only

    @classmethod
    def from_config(cls, item: Mapping[str, Any]) -> Target:
        """A Target from a config item; ValueError says what is wrong (the schema checked types)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise ValueError(f"unknown probe key(s): {', '.join(unknown)}")
        for key in ("name", "protocol", "host"):
            if not item.get(key):
                raise ValueError(f"probe needs {key!r}")
        values = {**TARGET_DEFAULTS, **item}
        name, protocol, tls = str(values["name"]), str(values["protocol"]), str(values["tls"])
        if not _NAME.match(name):
            raise ValueError(f"probe name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        if protocol not in PROTOCOLS:
            raise ValueError(f"probe {name}: protocol must be one of {', '.join(PROTOCOLS)}")
        if tls not in TLS_MODES:
            raise ValueError(f"probe {name}: tls must be one of {', '.join(TLS_MODES)}")
        if protocol == "http" and tls == "starttls":
            raise ValueError(f"probe {name}: http has no STARTTLS; use tls: implicit for https")
        path, ehlo = str(values["path"]), str(values["ehlo"])
        if protocol == "http" and not _PATH.fullmatch(path):
            # written into the request line as it is: a space, CR or LF would end it
            raise ValueError(f"probe {name}: path must start with / and hold only visible "
                             "ASCII (percent-encode the rest)")
        if not _EHLO.fullmatch(ehlo):
            raise ValueError(f"probe {name}: ehlo must be a host name or an address literal "
                             "such as [192.0.2.1]")
        port = int(values["port"]) or DEFAULT_PORTS[(protocol, tls)]
        return cls(
            name=name, protocol=protocol, host=host_name(values["host"]), port=port, tls=tls,
            timeout=duration_seconds(values["timeout"]),
            interval=duration_seconds(values["interval"]),
            credentials_file=str(values["credentials_file"]),
            insecure_skip_verify=bool(values["insecure_skip_verify"]),
            ca_file=str(values["ca_file"]), server_name=str(values["server_name"]),
            source_address=str(values["source_address"]), ehlo=ehlo,
            path=path, expect_status=tuple(int(s) for s in values["expect_status"]),
        )


def host_name(value: Any) -> str:
    """A host as the resolver takes it: an IPv6 literal may be written in brackets, as in
    a URL ([::1]), and goes without them (getaddrinfo knows no [::1])."""
    host = str(value)
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def duration_seconds(value: Any) -> float:
    """A duration from config ("10s") or a number of seconds (tests, code)."""
    return float(value) if isinstance(value, int | float) else parse_duration(str(value))


@dataclass(frozen=True)
class Credentials:
    """A user name and password read from a credentials_file; the repr hides the password."""

    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>)"


def read_credentials(path: str) -> Credentials:
    """Reads `user:password` from the first non-empty line of `path`.

    One line, split at the first colon (a password may contain colons, a user name
    may not), so a Kubernetes Secret key mounted as a file works as is. Read on every
    run, so a rotated secret is used without a reload. Errors never quote the file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read credentials_file {path}: {exc.strerror}") from None
    line = next((raw.rstrip("\r") for raw in text.split("\n") if raw.strip()), "")
    username, sep, password = line.partition(":")
    if not sep or not username or not password:
        raise ValueError(f"credentials_file {path} must hold one line user:password")
    return Credentials(username, password)


@dataclass
class TLSInfo:
    """The TLS side of a connection: what was negotiated and what the certificate says."""

    version: str = ""  # e.g. TLSv1.3
    cert_not_after: float | None = None  # Unix seconds, from the leaf certificate
    verified: bool = False  # chain and name verified against the system CAs or ca_file
    verify_error: str = ""  # why verification failed, e.g. "certificate has expired"

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "cert_not_after": self.cert_not_after,
                "verified": self.verified, "verify_error": self.verify_error}


@dataclass
class ProbeResult:
    """One probe run. `reason` says why it failed ("" on success); /health shows it."""

    success: bool = False
    reason: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds per PHASES entry
    tls: TLSInfo | None = None
    details: dict[str, Any] = field(default_factory=dict)  # capabilities, status code, ...
    phase: str = ""  # the phase the run was in last: where it stopped when it failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "reason": self.reason,
            "phase": self.phase,
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
            "tls": self.tls.as_dict() if self.tls else None,
            "details": self.details,
        }
