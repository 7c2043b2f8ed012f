"""IP allow/block lists over IPv4 and IPv6 CIDRs, fast enough for every login decision.

An `Entry` is plain data (strings and floats) so that stores can persist it
as is. A `CidrSet` answers "which entry covers this address?" with the most
specific unexpired one, by probing one dict per prefix length in use: with
100k entries that is a handful of dict lookups, not a scan.

Addresses and networks are normalised once, on the way in:

* a bare address is a host network (``/32`` or ``/128``);
* host bits are masked off, not rejected (``192.0.2.1/24`` -> ``192.0.2.0/24``),
  because feeds and operators write both forms and mean the same network;
* IPv4-mapped IPv6 (``::ffff:192.0.2.1``, ``::ffff:192.0.2.0/120``) is IPv4,
  since dual-stack listeners report IPv4 clients that way; below ``/96`` (all of IPv4)
  a mapped network names no IPv4 network and is refused.

A ban takes `ban_network`, which also refuses a ``/0``: it would refuse every client.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeAlias

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
# (version, integer value) or Attempt.address's (version, integer value, canonical text):
# an address parsed once, so a decision does not parse it again for every list.
ParsedIP: TypeAlias = tuple[int, int] | tuple[int, int, str]
IPLike: TypeAlias = str | Address | ParsedIP
Decision: TypeAlias = Literal["allow", "block", "neutral"]

_BITS = {4: 32, 6: 128}
_SOURCES = ("manual", "automatic", "config")


def parse_network(text: str) -> Network:
    """The network that `text` names, normalised (see the module docstring).

    Raises ValueError saying what was wrong, for logs and import reports.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty network")
    if "%" in text:  # the zone would be kept in the text and dropped from the match
        raise ValueError(f"a scoped IPv6 address (with %zone) cannot be listed: {text!r}")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"not an IP address or CIDR network: {text!r} ({exc})") from None
    if not isinstance(network, ipaddress.IPv6Network):
        return network
    if network.prefixlen >= 96:
        if int(network.network_address) >> 32 == 0xFFFF:
            mapped = int(network.network_address) & 0xFFFFFFFF
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    elif ipaddress.IPv6Address(text.partition("/")[0]).ipv4_mapped is not None:
        # masked, it left the mapped range (::ffff:0:0/95 is ::fffe:0:0/95): a ban of it
        # matched no IPv4 client, nor the IPv6 one it seemed to name
        raise ValueError("an IPv4-mapped network needs a prefix of /96 or longer (/96 is "
                         f"all of IPv4): {text!r}")
    return network


def ban_network(text: str) -> Network:
    """`parse_network` for a ban, which refuses a /0 (0.0.0.0/0, ::/0, ::ffff:0:0/96):
    taken, it refused every client."""
    network = parse_network(text)
    if network.prefixlen == 0:
        raise ValueError(f"{text.strip()!r} is every IPv{network.version} address: a ban of "
                         "it would refuse every client")
    return network


def _address(ip: IPLike) -> tuple[int, int]:
    """(version, integer value) of an address, IPv4-mapped IPv6 as IPv4.

    `socket.inet_pton` is several times faster than `ipaddress` for strings;
    `ipaddress` still handles what it rejects (zone ids) and words the errors.
    """
    if isinstance(ip, tuple):
        version, value = ip[0], ip[1]
    elif isinstance(ip, str):
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        except OSError:
            pass
        try:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
        except OSError:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"not an IP address: {ip!r}") from None
            version, value = address.version, int(address)
        else:
            version = 6
    else:
        version, value = ip.version, int(ip)
    if version == 6 and value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return version, value


def _mask(version: int, prefixlen: int) -> int:
    bits = _BITS[version]
    return ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)


@dataclass(frozen=True, slots=True)
class Entry:
    """One listed network; `network` is normalised on construction.

    `source` is "manual", "automatic" (the engine's own bans), "feed:<name>",
    "config" (from the YAML); `created` and `expires` are Unix seconds, and
    `expires=None` means permanent. An entry is expired from `expires` on.
    """

    network: str
    reason: str = ""
    source: str = "manual"
    created: float = 0.0
    expires: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "network", str(parse_network(self.network)))
        if not (self.source in _SOURCES or (self.source.startswith("feed:") and self.source[5:])):
            raise ValueError(
                "source must be manual, automatic, config or feed:<name>,"
                f" got {self.source!r}"
            )

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


def _key(network: str) -> tuple[int, int, int]:
    """(version, prefix length, network integer) of a network string."""
    parsed = parse_network(network)
    return parsed.version, parsed.prefixlen, int(parsed.network_address)


class CidrSet:
    """Entries keyed by network; `match` finds the most specific one covering an address.

    Per address family: prefix length -> {network integer: Entry}, and the
    prefix lengths in use, longest first. A lookup masks the address once per
    prefix length in use and stops at the first unexpired hit.
    """

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._tables: dict[int, dict[int, dict[int, Entry]]] = {4: {}, 6: {}}
        self._probes: dict[int, list[tuple[int, int, dict[int, Entry]]]] = {4: [], 6: []}
        for entry in entries:
            self.add(entry)

    def _reindex(self, version: int) -> None:
        tables = self._tables[version]
        self._probes[version] = [
            (plen, _mask(version, plen), tables[plen]) for plen in sorted(tables, reverse=True)
        ]

    def add(self, entry: Entry) -> Entry | None:
        """Add or replace the entry for `entry.network`; returns the one replaced."""
        version, plen, net = _key(entry.network)
        tables = self._tables[version]
        if plen not in tables:
            tables[plen] = {}
            self._reindex(version)
        previous = tables[plen].get(net)
        tables[plen][net] = entry
        return previous

    def remove(self, network: str) -> Entry | None:
        """Remove the entry for exactly this network (not the ones inside it)."""
        version, plen, net = _key(network)
        table = self._tables[version].get(plen)
        if table is None or net not in table:
            return None
        entry = table.pop(net)
        if not table:
            del self._tables[version][plen]
            self._reindex(version)
        return entry

    def get(self, network: str) -> Entry | None:
        """The entry for exactly this network, expired or not."""
        version, plen, net = _key(network)
        return self._tables[version].get(plen, {}).get(net)

    def match(self, ip: IPLike, now: float) -> Entry | None:
        """The most specific unexpired entry whose network contains `ip`."""
        if type(ip) is tuple and ip[0] == 4:  # parsed IPv4, what logins mostly bring
            version, value = 4, ip[1]  # what _address would return, without the call
        else:
            version, value = _address(ip)
        for _plen, mask, table in self._probes[version]:
            entry = table.get(value & mask)
            if entry is not None and not (entry.expires is not None and now >= entry.expires):
                return entry
        return None

    def last_to_expire(self, ip: IPLike, now: float) -> Entry | None:
        """The unexpired entry containing `ip` that ends last (a permanent one first, the
        most specific of equals): with bans that overlap, the one that says when `ip` is
        let in again. `match` answers the narrowest, which may end before a wider one."""
        if type(ip) is tuple and ip[0] == 4:  # as in match
            version, value = 4, ip[1]
        else:
            version, value = _address(ip)
        last, ends = None, 0.0
        for _plen, mask, table in self._probes[version]:
            entry = table.get(value & mask)
            if entry is None or entry.expired(now):
                continue
            if entry.expires is None:
                return entry
            if last is None or entry.expires > ends:
                last, ends = entry, entry.expires
        return last

    def expire(self, now: float) -> list[Entry]:
        """Drop expired entries and return them, for the caller's audit log."""
        gone = [entry for entry in self if entry.expired(now)]
        for entry in gone:
            self.remove(entry.network)
        return gone

    def __iter__(self) -> Iterator[Entry]:
        for tables in self._tables.values():
            for table in list(tables.values()):
                yield from list(table.values())

    def __len__(self) -> int:
        return sum(len(t) for tables in self._tables.values() for t in tables.values())


@dataclass
class Lists:
    """The three lists a login decision consults; trust and allow win over block."""

    allow: CidrSet = field(default_factory=CidrSet)
    block: CidrSet = field(default_factory=CidrSet)
    trusted: CidrSet = field(default_factory=CidrSet)
    """Trusted proxies and networks from the configuration (loopback by default)."""

    def trusted_entry(self, ip: IPLike, now: float) -> Entry | None:
        """The entry that makes `ip` trusted, if any."""
        return self.trusted.match(ip, now)

    def decide(self, ip: IPLike, now: float) -> tuple[Decision, Entry | None]:
        """Allow (trusted or allowlisted), block (blocklisted) or neutral.

        The entry returned is the one that decided, for the audit log and the API: for a
        block, the ban that ends last.
        """
        entry = self.trusted_entry(ip, now) or self.allow.match(ip, now)
        if entry is not None:
            return "allow", entry
        entry = self.block.last_to_expire(ip, now)
        if entry is not None:
            return "block", entry
        return "neutral", None


def prefix_of(ip: IPLike, v6_prefix: int = 64) -> str:
    """The network an address is tracked by: itself for IPv4, its /64 for IPv6.

    One IPv6 client usually holds a whole /64, so counting per address would let
    it rotate addresses past every limit.
    """
    if not 0 <= v6_prefix <= 128:
        raise ValueError(f"v6_prefix must be between 0 and 128, got {v6_prefix}")
    if isinstance(ip, tuple) and len(ip) == 3 and ip[0] == 4:
        return f"{ip[2]}/32"  # Attempt.address: the canonical text is at hand
    version, value = _address(ip)
    if version == 4:
        return f"{socket.inet_ntoa(value.to_bytes(4, 'big'))}/32"
    network = value & _mask(6, v6_prefix)
    if network >> 32 in (0, 0xFFFF):  # inet_ntop would write these with a dotted quad
        return f"{ipaddress.IPv6Address(network)}/{v6_prefix}"
    return f"{socket.inet_ntop(socket.AF_INET6, network.to_bytes(16, 'big'))}/{v6_prefix}"


def _rfc3339(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    spec = "seconds" if moment.microsecond == 0 else "microseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")


def _parse_rfc3339(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expires is not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None:
        raise ValueError(f"expires needs a time zone (e.g. 'Z'): {text!r}")
    return moment.timestamp()


def export_text(entries: Iterable[Entry]) -> str:
    """One line per entry: ``<cidr> [expires=<RFC3339>] [source=<source>] # <reason>``.

    Entries are written in their given order; the creation time is not kept.
    """
    lines = []
    for entry in entries:
        parts = [entry.network]
        if entry.expires is not None:
            parts.append(f"expires={_rfc3339(entry.expires)}")
        parts.append(f"source={entry.source}")
        reason = " ".join(entry.reason.split())
        if reason:
            parts.append(f"# {reason}")
        lines.append(" ".join(parts) + "\n")
    return "".join(lines)


def import_text(text: str, source: str, now: float) -> tuple[list[Entry], list[tuple[int, str]]]:
    """Parse `export_text` output or a plain list of addresses/CIDRs.

    ``#`` and ``;`` start a comment (fail2ban and Spamhaus DROP style); the
    comment after an address becomes its reason. A ``source=`` on a line wins
    over `source`. Bad lines, and entries already expired at `now`, are reported
    as (line number, message) and skipped; the rest are returned with
    ``created=now``.
    """
    entries: list[Entry] = []
    errors: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        cut = min((i for i in (line.find("#"), line.find(";")) if i >= 0), default=len(line))
        fields, reason = line[:cut].split(), line[cut + 1 :].strip()
        if not fields:
            continue
        try:
            entries.append(_entry_from_fields(fields, reason, source, now))
        except ValueError as exc:
            errors.append((number, str(exc)))
    return entries, errors


def _entry_from_fields(fields: list[str], reason: str, source: str, now: float) -> Entry:
    network, options = fields[0], dict.fromkeys(("expires", "source"), "")
    for option in fields[1:]:
        name, sep, value = option.partition("=")
        if not sep or name not in options:
            raise ValueError(f"unexpected {option!r} (expected expires=... or source=...)")
        options[name] = value
    ban_network(network)
    expires = _parse_rfc3339(options["expires"]) if options["expires"] else None
    if expires is not None and expires <= now:
        raise ValueError(f"{network} expired at {options['expires']}; skipped")
    return Entry(network, reason, options["source"] or source, now, expires)
