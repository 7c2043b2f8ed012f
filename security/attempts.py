"""Login attempts, decisions and the keys failures are tracked under."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# Protocol names we keep as metric label values; anything else is "other".
KNOWN_PROTOCOLS = frozenset({"imap", "pop3", "smtp", "submission", "lmtp", "sieve",
                             "managesieve", "http", "jmap", "webmail", "caldav", "carddav"})


@dataclass(frozen=True)
class Attempt:
    """One login as a mail server reports it. `pwhash` identifies the password tried
    (Dovecot sends a truncated salted hash); the password itself never gets here."""

    login: str
    remote_ip: str
    protocol: str = "unknown"
    tls: bool = False
    session_id: str = ""
    pwhash: str = ""
    device_id: str = ""  # a stable id of the client device (a web front end's cookie), if any

    @property
    def protocol_label(self) -> str:
        name = self.protocol.lower()
        return name if name in KNOWN_PROTOCOLS else "other"


@dataclass(frozen=True)
class Decision:
    """allow, delay (tarpit: answer after `delay` seconds), reject, or mfa_required (check
    the password, then ask for a second factor; `delay` may be set too), with the reason."""

    action: str  # allow | delay | reject | mfa_required
    reason: str  # ok | trusted | allowlisted | tarpit | banned | locked | account_locked | ...
    #              and for mfa_required: risky_network | risky_source | new_device | new_source
    delay: float = 0.0
    message: str = ""
    retry_after: float = 0.0


ALLOW = Decision("allow", "ok")


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The client address; an IPv4-mapped IPv6 address becomes its IPv4 address."""
    address = ipaddress.ip_address(text.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Keys:
    """The store keys one attempt counts under."""

    source: str  # s:<network>                failures from this source, any account
    account: str  # a:<login>                 failures for this account, any source
    pair: str  # p:<network>|<login>          this account from this source


def tracking_keys(login: str, network: str) -> Keys:
    account = login.strip().lower()
    return Keys(f"s:{network}", f"a:{account}", f"p:{network}|{account}")
