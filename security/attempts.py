"""Login attempts, decisions and the keys failures are tracked under."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

# Protocol names we keep as metric label values; anything else is "other".
KNOWN_PROTOCOLS = frozenset({"imap", "pop3", "smtp", "submission", "lmtp", "sieve",
                             "managesieve", "http", "jmap", "webmail", "caldav", "carddav"})


_T = TypeVar("_T")


class _computed_once(Generic[_T]):  # noqa: N801 - used like functools.cached_property
    """functools.cached_property without the lock Python 3.11 takes on every first access
    (about 1 µs of a login decision): the value goes into the instance's __dict__, where
    later reads find it before this (non-data) descriptor."""

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        value: _T = self.compute(instance)
        vars(instance)[self.name] = value
        return value


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

    @_computed_once
    def address(self) -> tuple[int, int, str]:
        """(IP version, integer value, canonical text) of remote_ip, parsed once per attempt
        (the front end validates it, the engine uses it for lists and keys).
        Raises ValueError for what parse_ip rejects."""
        return parse_address(self.remote_ip)

    @classmethod
    def known(cls, address: tuple[int, int, str], login: str, remote_ip: str,
              protocol: str = "unknown", tls: bool = False, session_id: str = "",
              pwhash: str = "", device_id: str = "") -> Attempt:
        """Attempt(...) whose remote_ip the caller has parsed already (`address` is
        parse_address(remote_ip)): the cached property starts out set. The same object
        as the constructor makes (the generated __init__ only stores the fields), built
        in one dict update instead of a frozen __setattr__ per field."""
        attempt = object.__new__(cls)
        vars(attempt).update(login=login, remote_ip=remote_ip, protocol=protocol, tls=tls,
                             session_id=session_id, pwhash=pwhash, device_id=device_id,
                             address=address)
        return attempt

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
#              | factor_disabled
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


def parse_address(text: str) -> tuple[int, int, str]:
    """What parse_ip accepts, as (version, integer value, canonical text).

    Addresses written as inet_ntop writes them (what mail servers send) go through
    inet_pton, a fraction of ipaddress's cost; that they format back to the same text
    keeps this path exactly as strict as ipaddress, and for IPv6 outside ::/96 and
    ::ffff:0:0/96 inet_ntop's text is ipaddress's. Everything else (other spellings,
    IPv4-mapped, surrounding blanks, errors and their wording) goes through parse_ip.
    """
    try:
        if ":" in text:
            packed = socket.inet_pton(socket.AF_INET6, text)
            value = int.from_bytes(packed, "big")
            if value >> 32 not in (0, 0xFFFF) and socket.inet_ntop(
                    socket.AF_INET6, packed) == text:
                return 6, value, text
        else:
            packed = socket.inet_pton(socket.AF_INET, text)
            if socket.inet_ntoa(packed) == text:
                return 4, int.from_bytes(packed, "big"), text
    except (OSError, ValueError):  # ValueError: an embedded NUL
        pass
    address = parse_ip(text)
    return address.version, int(address), str(address)


@dataclass(frozen=True)
class Keys:
    """The store keys one attempt counts under."""

    source: str  # s:<network>                failures from this source, any account
    account: str  # a:<login>                 failures for this account, any source
    pair: str  # p:<network>|<login>          this account from this source


def tracking_keys(login: str, network: str) -> Keys:
    account = login.strip().lower()
    return Keys(f"s:{network}", f"a:{account}", f"p:{network}|{account}")
