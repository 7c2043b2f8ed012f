"""Mail DNS checks per configured domain (monitoring.dns), on their own schedule.

Every check is a small async function over a dnspython resolver pointed at the
configured nameservers, returning a `Finding` (ok, reason, details); it never
raises. Checks, as `check` label values of a3mailer_dns_check_success:

- mx: the domain has MX records (not the RFC 7505 null MX) and every MX host
  has an A or AAAA address.
- spf: exactly one `v=spf1` TXT record, syntactically valid (RFC 7208: version,
  mechanisms, qualifiers, modifiers, macros, CIDR lengths), no `+all`, and at
  most 10 DNS-querying terms. Counting depth: include/a/mx/ptr/exists/redirect
  each count 1; the records named by include: and redirect= are fetched,
  parsed and counted the same way, recursively, stopping as soon as the count
  passes 10 (so at most 11 TXT lookups). a/mx/ptr/exists targets are counted,
  never resolved (the per-mechanism 10-name and void-lookup limits are not
  checked); include/redirect targets containing macros are counted, not
  followed; terms after `all` and a redirect beside `all` are never evaluated
  by receivers, so they do not count.
- dmarc: exactly one `v=DMARC1` record at _dmarc.<domain> with a valid `p=`
  (exported as the a3mailer_dns_dmarc_policy state set). The configured domain
  itself is checked: no fallback to the organizational domain.
- dkim: a usable key (`p=` present, not revoked, valid base64) at
  <selector>._domainkey.<domain> for every configured selector (per selector in
  a3mailer_dns_dkim_success).
- mta_sts: one `v=STSv1; id=...` TXT at _mta-sts.<domain>, the policy file at
  https://mta-sts.<domain>/.well-known/mta-sts.txt (HTTP 200, text/plain, no
  redirect, valid version/mode/mx/max_age), and every MX host matching one of
  the policy's mx patterns. mta-sts.<domain> is resolved through the configured
  nameservers like every other name here; the certificate is verified for that
  name against the system CAs, or only against `mta_sts_ca_file` when set;
  `mta_sts_port` (443 per RFC 8461) exists for tests and local relays.
- tlsa: every MX host has a well-formed TLSA record at _25._tcp.<mx> (DANE,
  RFC 7672). Presence and syntax only: DNSSEC validation and matching the
  record against the served certificate are not checked here.
- fcrdns: every configured sending IP of the domain has a PTR whose name's
  A/AAAA records include that IP (forward-confirmed reverse DNS).

`timeout` bounds every DNS query and the HTTPS policy fetch; checks of one
domain run concurrently after its MX lookup; up to 8 domains run at once.
A whole run is bounded by the interval; a run that fails as a whole reports
every configured check as failed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from exporter import catalogue
from exporter.health import CheckResult, Status
from exporter.schedule import Periodic

if TYPE_CHECKING:
    import dns.asyncresolver
    import dns.resolver
    from prometheus_client.core import Metric

# dnspython (~3.6 MB resident, ~0.35 s to import) is imported when DNS checks or DNSBL
# zones are configured (load_dnspython), not at start: a host without them never loads it.

log = logging.getLogger(__name__)

CHECKS = ("mx", "spf", "dmarc", "dkim", "mta_sts", "tlsa", "fcrdns")
DMARC_POLICIES = ("none", "quarantine", "reject")
MTA_STS_MODES = ("enforce", "testing", "none")
SPF_LOOKUP_LIMIT = 10
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 §3.3: senders may refuse larger policies
DOMAIN_CONCURRENCY = 8


class Finding(NamedTuple):
    """One check's outcome: passed or not, why (for people), and what was seen."""

    ok: bool
    reason: str
    details: dict[str, Any]


def passed(reason: str, **details: Any) -> Finding:
    return Finding(True, reason, details)


def failed(reason: str, **details: Any) -> Finding:
    return Finding(False, reason, details)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DomainSettings:
    name: str
    dkim_selectors: tuple[str, ...] = ()
    mta_sts: bool = True
    dane: bool = True
    sending_ips: tuple[str, ...] = ()

    def checks(self) -> list[str]:
        """The checks configured for this domain, in CHECKS order."""
        wanted = {"mx", "spf", "dmarc"}
        wanted |= {"dkim"} if self.dkim_selectors else set()
        wanted |= {"mta_sts"} if self.mta_sts else set()
        wanted |= {"tlsa"} if self.dane else set()
        wanted |= {"fcrdns"} if self.sending_ips else set()
        return [c for c in CHECKS if c in wanted]


@dataclass(frozen=True)
class DnsSettings:
    interval: float = 600.0
    timeout: float = 5.0
    nameservers: tuple[str, ...] = ()
    port: int = 53
    domains: tuple[DomainSettings, ...] = ()
    mta_sts_ca_file: str = ""
    mta_sts_port: int = 443

    @classmethod
    def from_config(cls, section: Mapping[str, Any],
                    seconds: Callable[[str], float]) -> DnsSettings:
        """From the validated monitoring.dns section; `seconds` parses durations."""
        return cls(
            interval=seconds(section["interval"]),
            timeout=seconds(section["timeout"]),
            nameservers=tuple(section["nameservers"]),
            port=int(section["port"]),
            domains=tuple(
                DomainSettings(
                    name=_normalize(d["name"]),
                    dkim_selectors=tuple(d.get("dkim_selectors", ())),
                    mta_sts=bool(d.get("mta_sts", True)),
                    dane=bool(d.get("dane", True)),
                    sending_ips=tuple(d.get("sending_ips", ())),
                )
                for d in section["domains"]
            ),
            mta_sts_ca_file=section.get("mta_sts_ca_file", ""),
            mta_sts_port=int(section.get("mta_sts_port", 443)),
        )


def load_dnspython() -> None:
    """Imports dnspython as DNS checks or DNSBL zones are built (start or reload), so that
    their first run does not hold up the event loop for the import."""
    import dns.asyncresolver  # noqa: F401
    import dns.exception  # noqa: F401
    import dns.resolver  # noqa: F401
    import dns.reversename  # noqa: F401


def make_resolver(nameservers: Sequence[str], port: int, timeout: float
                  ) -> dns.asyncresolver.Resolver:
    """A resolver for `nameservers` on `port` (the system's resolv.conf when empty),
    no cache, each query bounded by `timeout` seconds in total."""
    import dns.asyncresolver

    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver


# --------------------------------------------------------------------------- DNS lookups


class DnsFailure(Exception):
    """A lookup that gave no records; `missing` when the name or type does not exist."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # nxdomain | no_answer | timeout | failed | error

    @property
    def missing(self) -> bool:
        return self.kind in ("nxdomain", "no_answer")


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def servers_said(exc: dns.resolver.NoNameservers) -> str:
    """What each nameserver answered, for a NoNameservers failure."""
    errors = exc.kwargs.get("errors") or []
    said = [f"{server} answered {error}" for server, _tcp, _port, error, *_ in errors]
    return "; ".join(said) or "no server could answer"


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[Any]:
    """The records of `name`/`rdtype`, or DnsFailure with a reason people can act on."""
    import dns.exception
    import dns.resolver

    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except dns.resolver.NXDOMAIN:
        raise DnsFailure("nxdomain", f"NXDOMAIN: {name} does not exist") from None
    except dns.resolver.NoAnswer:
        raise DnsFailure("no_answer", f"no {rdtype} record at {name}") from None
    except dns.exception.Timeout:
        raise DnsFailure("timeout", f"{name} {rdtype}: no answer within "
                         f"{resolver.lifetime:g}s (timed out)") from None
    except dns.resolver.NoNameservers as exc:
        raise DnsFailure("failed", f"{name} {rdtype}: {servers_said(exc)}") from None
    except dns.exception.DNSException as exc:
        raise DnsFailure("error", f"{name} {rdtype}: {exc}") from None
    return list(answer)


async def txt_records(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    """TXT records of `name`, each one's strings joined (RFC 7208 §3.3)."""
    return [b"".join(r.strings).decode("utf-8", "replace")
            for r in await lookup(resolver, name, "TXT")]


async def addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """A and AAAA addresses of `host`; [] when it has none; DnsFailure when a lookup fails."""
    found: list[str] = []
    problems: list[DnsFailure] = []
    for result in await asyncio.gather(lookup(resolver, host, "A"),
                                       lookup(resolver, host, "AAAA"),
                                       return_exceptions=True):
        if isinstance(result, DnsFailure):
            problems.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            found += [r.address for r in result]
    failures = [p for p in problems if not p.missing]
    if not found and failures:
        raise failures[0]
    return found


def _missing_or_failed(what: str, failure: DnsFailure) -> Finding:
    if failure.missing:
        text = str(failure)
        reason = text if text.startswith(f"no {what}") else f"no {what}: {text}"
        return failed(reason, error=failure.kind)
    return failed(f"{what} lookup failed: {failure}", error=failure.kind)


# --------------------------------------------------------------------------- MX


async def check_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> Finding:
    """MX records exist (not a null MX) and every MX host has an address.

    details["hosts"] lists the MX hosts by preference whenever MX records exist.
    """
    try:
        records = await lookup(resolver, domain, "MX")
    except DnsFailure as failure:
        return _missing_or_failed("MX record", failure)
    records.sort(key=lambda r: (r.preference, r.exchange.to_text()))
    hosts = [_normalize(r.exchange.to_text()) for r in records]
    if hosts == [""]:
        return failed("null MX (RFC 7505): the domain accepts no mail", hosts=[])
    hosts = [h for h in hosts if h]
    results = await asyncio.gather(*(addresses(resolver, h) for h in hosts),
                                   return_exceptions=True)
    problems = []
    for host, result in zip(hosts, results, strict=True):
        if isinstance(result, DnsFailure):
            problems.append(f"{host}: {result}")
        elif isinstance(result, BaseException):
            raise result
        elif not result:
            problems.append(f"{host} has no A/AAAA address")
    if problems:
        return failed("MX host without an address: " + "; ".join(problems), hosts=hosts)
    return passed(f"{len(hosts)} MX host(s): {', '.join(hosts)}", hosts=hosts)


# --------------------------------------------------------------------------- SPF


class SpfError(ValueError):
    """The SPF record is not valid (receivers answer permerror)."""


SPF_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
SPF_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
_MACRO = re.compile(r"%\{([A-Za-z])(\d*)(r?)([.\-+,/_=]*)\}|%%|%_|%-")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)", re.S)
_MECHANISM = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)", re.S)
_DOMAIN_PART = r"(?:%\{[^}]*\}|%[%_-]|[^/%])+"
_DUAL_CIDR = re.compile(rf"(?::(?P<domain>{_DOMAIN_PART}))?(?:/(?P<v4>\d+))?(?://(?P<v6>\d+))?")
_TOPLABEL = re.compile(r"[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9]")


@dataclass(frozen=True)
class SpfTerm:
    qualifier: str  # + - ~ ? for mechanisms ("+" when written without); "" for modifiers
    name: str  # mechanism or modifier name, lower case
    value: str  # the target after ":" or "=", without CIDR lengths ("" when none)
    modifier: bool = False

    def __str__(self) -> str:
        if self.modifier:
            return f"{self.name}={self.value}"
        return f"{self.qualifier if self.qualifier != '+' else ''}{self.name}" + (
            f":{self.value}" if self.value else "")


@dataclass(frozen=True)
class SpfRecord:
    terms: tuple[SpfTerm, ...]
    warnings: tuple[str, ...] = ()

    def modifier(self, name: str) -> str | None:
        return next((t.value for t in self.terms if t.modifier and t.name == name), None)

    def evaluated(self) -> list[SpfTerm]:
        """The DNS-relevant terms a receiver can evaluate: mechanisms up to the first
        `all`, then `redirect` only when there is no `all` (RFC 7208 §5.1, §6.1)."""
        mechanisms: list[SpfTerm] = []
        for term in self.terms:
            if term.modifier:
                continue
            mechanisms.append(term)
            if term.name == "all":
                return mechanisms
        redirect = [t for t in self.terms if t.modifier and t.name == "redirect"]
        return mechanisms + redirect

    def lookups(self) -> int:
        """DNS-querying terms in this record alone (not counting what it includes)."""
        return sum(1 for t in self.evaluated() if t.name in SPF_LOOKUP_TERMS)


def spf_records(txts: Sequence[str]) -> list[str]:
    """The TXT records that are SPF records: `v=spf1` alone or followed by a space."""
    return [t for t in txts if t[:6].lower() == "v=spf1" and (len(t) == 6 or t[6] == " ")]


def check_macro_string(value: str, letters: str = "slodiphv") -> None:
    """Raises SpfError unless `value` is an RFC 7208 §7.1 macro-string."""
    for match in _MACRO.finditer(value):
        letter = match.group(1)
        if letter is not None and letter.lower() not in letters:
            raise SpfError(f"macro letter {letter!r} not allowed in {value!r}")
    literal = _MACRO.sub("", value)
    if "%" in literal:
        raise SpfError(f"malformed macro in {value!r}")
    if any(not 0x21 <= ord(c) <= 0x7E for c in literal):
        raise SpfError(f"invalid character in {value!r}")


def check_domain_spec(value: str) -> None:
    """Raises SpfError unless `value` is an RFC 7208 domain-spec (macros allowed)."""
    if not value:
        raise SpfError("empty domain")
    check_macro_string(value)
    if value.endswith("}") and _MACRO.search(value):
        return  # domain-end is a macro-expand
    labels = (value[:-1] if value.endswith(".") else value).split(".")
    if len(labels) < 2 or not _TOPLABEL.fullmatch(labels[-1]):
        raise SpfError(f"{value!r} is not a fully qualified domain")
    if "%" not in value and any(not 0 < len(label) < 64 for label in labels):
        raise SpfError(f"{value!r} has an empty or overlong label")


def _check_cidr(text: str | None, bits: int, what: str) -> None:
    if text is not None and (len(text) > 1 and text.startswith("0") or int(text) > bits):
        raise SpfError(f"invalid {what} prefix length /{text}")


def _mechanism(qualifier: str, name: str, rest: str) -> SpfTerm:
    term = f"{qualifier}{name}{rest}"
    if name == "all":
        if rest:
            raise SpfError(f"'all' takes no argument: {term!r}")
        return SpfTerm(qualifier or "+", name, "")
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise SpfError(f"{name} needs ':domain': {term!r}")
        check_domain_spec(rest[1:])
        return SpfTerm(qualifier or "+", name, rest[1:])
    if name in ("a", "mx", "ptr"):
        match = _DUAL_CIDR.fullmatch(rest)
        if match is None or (name == "ptr" and (match["v4"] or match["v6"])):
            raise SpfError(f"invalid {name} mechanism: {term!r}")
        if match["domain"] is not None:
            check_domain_spec(match["domain"])
        _check_cidr(match["v4"], 32, "IPv4")
        _check_cidr(match["v6"], 128, "IPv6")
        return SpfTerm(qualifier or "+", name, match["domain"] or "")
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise SpfError(f"{name} needs ':address': {term!r}")
        address, _, prefix = rest[1:].partition("/")
        try:
            if name == "ip4":
                ipaddress.IPv4Address(address)
            else:
                ipaddress.IPv6Address(address)
        except ValueError:
            raise SpfError(f"invalid address in {term!r}") from None
        if "/" in rest:
            if not prefix.isdigit():
                raise SpfError(f"invalid prefix length in {term!r}")
            _check_cidr(prefix, 32 if name == "ip4" else 128, name)
        return SpfTerm(qualifier or "+", name, rest[1:])
    raise SpfError(f"unknown mechanism {name!r} in {term!r}")


def parse_spf(record: str) -> SpfRecord:
    """Parses one SPF record (RFC 7208 §4.6, §12); raises SpfError on the first problem."""
    parts = [p for p in record.split(" ") if p]
    if not parts or parts[0].lower() != "v=spf1":
        raise SpfError("the record must start with 'v=spf1'")
    terms: list[SpfTerm] = []
    warnings: list[str] = []
    for part in parts[1:]:
        modifier = _MODIFIER.fullmatch(part)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in SPF_MECHANISMS:
                raise SpfError(f"{part!r}: mechanisms take ':', not '='")
            if name in ("redirect", "exp"):
                if any(t.modifier and t.name == name for t in terms):
                    raise SpfError(f"more than one {name}= modifier")
                check_domain_spec(value)
            else:
                check_macro_string(value, letters="slodiphvcrt")
            terms.append(SpfTerm("", name, value, modifier=True))
            continue
        mechanism = _MECHANISM.fullmatch(part)
        if mechanism is None:
            raise SpfError(f"invalid term {part!r}")
        qualifier, name, rest = mechanism.groups()
        terms.append(_mechanism(qualifier, name.lower(), rest))
    names = [t.name for t in terms if not t.modifier]
    if "all" in names and names.index("all") < len(names) - 1:
        warnings.append("terms after 'all' are never evaluated")
    if "all" in names and any(t.modifier and t.name == "redirect" for t in terms):
        warnings.append("redirect= is ignored because the record has 'all'")
    if "ptr" in names:
        warnings.append("the ptr mechanism is slow and SHOULD NOT be used (RFC 7208 §5.5)")
    return SpfRecord(tuple(terms), tuple(warnings))


class SpfLookupFailed(Exception):
    """An included record could not be fetched (a DNS problem, not a syntax one)."""


async def spf_lookup_count(resolver: dns.asyncresolver.Resolver, record: SpfRecord,
                           path: tuple[str, ...], limit: int = SPF_LOOKUP_LIMIT) -> int:
    """DNS-querying terms of `record` plus, recursively, of the records it includes or
    redirects to, in evaluation order; returns limit + 1 as soon as the count passes
    `limit` (no deeper lookups). `path` is the chain of domains for loop detection.
    Raises SpfError (invalid or missing included record, loop) or SpfLookupFailed.
    """
    count = 0

    async def walk(current: SpfRecord, chain: tuple[str, ...]) -> bool:
        nonlocal count
        for term in current.evaluated():
            if term.name not in SPF_LOOKUP_TERMS:
                continue
            count += 1
            if count > limit:
                return False
            if term.name not in ("include", "redirect") or "%" in term.value:
                continue
            target = _normalize(term.value)
            if target in chain:
                raise SpfError(f"{term} loops back to {target}")
            try:
                found = spf_records(await txt_records(resolver, target))
            except DnsFailure as failure:
                if failure.missing:
                    raise SpfError(f"{term}: {target} has no SPF record ({failure})") from None
                raise SpfLookupFailed(f"{term}: {failure}") from None
            if len(found) != 1:
                raise SpfError(f"{term}: {target} has {len(found) or 'no'} SPF records"
                               if found else f"{term}: {target} has no SPF record")
            try:
                included = parse_spf(found[0])
            except SpfError as exc:
                raise SpfError(f"{term}: {target}: {exc}") from None
            if not await walk(included, (*chain, target)):
                return False
        return True

    await walk(record, path)
    return min(count, limit + 1)


async def check_spf(resolver: dns.asyncresolver.Resolver, domain: str) -> Finding:
    try:
        found = spf_records(await txt_records(resolver, domain))
    except DnsFailure as failure:
        return _missing_or_failed("SPF record", failure)
    if not found:
        return failed(f"no SPF record (no TXT record at {domain} starts with v=spf1)")
    if len(found) > 1:
        return failed(f"{len(found)} SPF records at {domain}; RFC 7208 §4.5 allows one "
                      "(receivers answer permerror)", records=found)
    text = found[0]
    try:
        record = parse_spf(text)
        lookups = await spf_lookup_count(resolver, record, (domain,))
    except SpfError as exc:
        return failed(f"invalid SPF record: {exc}", record=text)
    except SpfLookupFailed as exc:
        return failed(f"SPF include lookup failed: {exc}", record=text)
    details = {"record": text, "lookups": lookups, "warnings": list(record.warnings)}
    if lookups > SPF_LOOKUP_LIMIT:
        return failed(f"more than {SPF_LOOKUP_LIMIT} DNS-querying terms (include, a, mx, ptr, "
                      "exists, redirect) counting included records: receivers answer "
                      "permerror", **details)
    everything = [t for t in record.evaluated() if t.name == "all" and t.qualifier == "+"]
    if everything:
        return failed("the record ends in +all: every host may send as the domain", **details)
    return passed(f"valid SPF record, {lookups} of {SPF_LOOKUP_LIMIT} DNS lookups", **details)


# --------------------------------------------------------------------------- DMARC and DKIM


class TagError(ValueError):
    """A DMARC, DKIM or MTA-STS TXT record that is not valid."""


def parse_tags(text: str) -> dict[str, str]:
    """`tag=value; tag=value;` lists (DKIM, DMARC, MTA-STS TXT); tag names lower-cased."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise TagError(f"invalid tag {part!r}")
        if name in tags:
            raise TagError(f"duplicate tag {name!r}")
        tags[name] = value.strip()
    return tags


@dataclass(frozen=True)
class DmarcRecord:
    policy: str
    subdomain_policy: str
    pct: int
    tags: dict[str, str] = field(default_factory=dict)


_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s,!]+(?:![0-9]+[kmgt]?)?")


def parse_dmarc(text: str) -> DmarcRecord:
    """Parses a DMARC record (RFC 7489 §6.3); raises TagError."""
    tags = parse_tags(text)
    if next(iter(tags), None) != "v" or tags["v"] != "DMARC1":
        raise TagError("the record must start with v=DMARC1")
    if "p" not in tags:
        raise TagError("no p= (policy) tag")
    policy = tags["p"].lower()
    if policy not in DMARC_POLICIES:
        raise TagError(f"p={tags['p']} is not none, quarantine or reject")
    subdomain = tags.get("sp", policy).lower()
    if subdomain not in DMARC_POLICIES:
        raise TagError(f"sp={tags['sp']} is not none, quarantine or reject")
    pct = tags.get("pct", "100")
    if not pct.isdigit() or int(pct) > 100:
        raise TagError(f"pct={pct} is not 0..100")
    for tag in ("adkim", "aspf"):
        if tags.get(tag, "r").lower() not in ("r", "s"):
            raise TagError(f"{tag}={tags[tag]} is not r or s")
    if not tags.get("ri", "86400").isdigit():
        raise TagError(f"ri={tags['ri']} is not a number of seconds")
    for tag in ("rua", "ruf"):
        for uri in filter(None, (u.strip() for u in tags.get(tag, "").split(","))):
            if not _URI.fullmatch(uri):
                raise TagError(f"{tag}: {uri!r} is not a URI")
    return DmarcRecord(policy, subdomain, int(pct), tags)


async def check_dmarc(resolver: dns.asyncresolver.Resolver, domain: str) -> Finding:
    name = f"_dmarc.{domain}"
    try:
        found = [t for t in await txt_records(resolver, name)
                 if t.lstrip().lower().startswith("v=dmarc1")]
    except DnsFailure as failure:
        return _missing_or_failed("DMARC record", failure)
    if not found:
        return failed(f"no DMARC record (no TXT record at {name} starts with v=DMARC1)")
    if len(found) > 1:
        return failed(f"{len(found)} DMARC records at {name}: receivers ignore them all",
                      records=found)
    try:
        record = parse_dmarc(found[0])
    except TagError as exc:
        return failed(f"invalid DMARC record: {exc}", record=found[0])
    return passed(f"DMARC policy {record.policy}", policy=record.policy,
                  subdomain_policy=record.subdomain_policy, pct=record.pct, record=found[0])


def parse_dkim_key(text: str) -> dict[str, str]:
    """Checks a DKIM key record (RFC 6376 §3.6.1); returns its tags; raises TagError."""
    tags = parse_tags(text)
    if "v" in tags and (next(iter(tags)) != "v" or tags["v"] != "DKIM1"):
        raise TagError("v= must come first and be DKIM1")
    if "p" not in tags:
        raise TagError("no p= (public key) tag")
    key = re.sub(r"\s+", "", tags["p"])
    if not key:
        raise TagError("empty p=: the key is revoked")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise TagError("p= is not valid base64") from None
    algorithm = tags.get("k", "rsa").lower()
    if algorithm not in ("rsa", "ed25519"):
        raise TagError(f"k={tags['k']} is not rsa or ed25519")
    if algorithm == "ed25519" and len(raw) != 32:
        raise TagError("an ed25519 key must be 32 bytes")
    if algorithm == "rsa" and (len(raw) < 64 or raw[0] != 0x30):
        raise TagError("p= is not an RSA public key (DER SubjectPublicKeyInfo)")
    return tags


async def check_dkim(resolver: dns.asyncresolver.Resolver, domain: str,
                     selector: str) -> Finding:
    name = f"{selector}._domainkey.{domain}"
    try:
        found = await txt_records(resolver, name)
    except DnsFailure as failure:
        return _missing_or_failed(f"DKIM key for selector {selector}", failure)
    if len(found) != 1:
        return failed(f"{len(found)} TXT records at {name}; a verifier may use any of them")
    try:
        tags = parse_dkim_key(found[0])
    except TagError as exc:
        return failed(f"selector {selector}: invalid DKIM key record: {exc}")
    return passed(f"selector {selector}: {tags.get('k', 'rsa')} key present",
                  algorithm=tags.get("k", "rsa"))


# --------------------------------------------------------------------------- MTA-STS


@dataclass(frozen=True)
class StsPolicy:
    version: str
    mode: str
    max_age: int
    mx: tuple[str, ...]


def parse_sts_txt(text: str) -> str:
    """The policy id of an `_mta-sts` TXT record (RFC 8461 §3.1); raises TagError."""
    tags = parse_tags(text)
    if next(iter(tags), None) != "v" or tags["v"] != "STSv1":
        raise TagError("the record must start with v=STSv1")
    policy_id = tags.get("id", "")
    if not re.fullmatch(r"[A-Za-z0-9]{1,32}", policy_id):
        raise TagError("id= must be 1 to 32 letters and digits")
    return policy_id


def parse_sts_policy(text: str) -> StsPolicy:
    """Parses an MTA-STS policy file (RFC 8461 §3.2); raises TagError."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise TagError(f"invalid policy line {line!r}")
        if key == "mx":
            mx.append(_normalize(value))
        elif key in fields:
            raise TagError(f"duplicate {key!r} field")
        else:
            fields[key] = value
    if fields.get("version") != "STSv1":
        raise TagError("version must be STSv1")
    mode = fields.get("mode", "")
    if mode not in MTA_STS_MODES:
        raise TagError(f"mode {mode!r} is not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or int(max_age) > 31557600:
        raise TagError(f"max_age {max_age!r} is not 0..31557600 seconds")
    if mode != "none" and not mx:
        raise TagError("no mx: patterns")
    for pattern in mx:
        if not re.fullmatch(r"(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9-]+", pattern):
            raise TagError(f"invalid mx pattern {pattern!r}")
    return StsPolicy("STSv1", mode, int(max_age), tuple(mx))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact, or `*.` standing for exactly one leftmost label."""
    pattern, host = _normalize(pattern), _normalize(host)
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


class PolicyFetchError(Exception):
    """The policy file could not be fetched, or the server answered wrongly."""


@dataclass(frozen=True)
class PolicyFetcher:
    """How policy files are fetched: TLS context (or why there is none), port, timeout."""

    context: ssl.SSLContext | None
    context_error: str
    port: int
    timeout: float

    @classmethod
    def build(cls, ca_file: str, port: int, timeout: float) -> PolicyFetcher:
        try:
            return cls(ssl.create_default_context(cafile=ca_file or None), "", port, timeout)
        except (OSError, ssl.SSLError) as exc:
            return cls(None, f"cannot load mta_sts_ca_file {ca_file!r}: {exc}", port, timeout)

    async def fetch(self, host: str, address: str) -> tuple[str, str]:
        """GET https://<host>/.well-known/mta-sts.txt from `address`: (content type, body)."""
        if self.context is None:
            raise PolicyFetchError(self.context_error)
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(
                address, self.port, ssl=self.context, server_hostname=host)
            try:
                authority = host if self.port == 443 else f"{host}:{self.port}"
                writer.write((f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {authority}\r\n"
                              "User-Agent: a3mailer-exporter\r\nAccept: text/plain\r\n"
                              "Connection: close\r\n\r\n").encode())
                await writer.drain()
                raw = b""
                while len(raw) <= MAX_POLICY_BYTES + 8192:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    raw += chunk
            finally:
                writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        return parse_http_response(raw)


def parse_http_response(raw: bytes) -> tuple[str, str]:
    """(content type, body) of a 200 response; PolicyFetchError otherwise."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise PolicyFetchError("incomplete HTTP response")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        raise PolicyFetchError(f"invalid HTTP status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    code = int(status[1])
    if 300 <= code < 400:
        raise PolicyFetchError(f"HTTP {code} redirect: RFC 8461 §3.3 forbids following it")
    if code != 200:
        raise PolicyFetchError(f"HTTP {code}")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _unchunk(body)
    elif headers.get("content-length", "").isdigit():
        length = int(headers["content-length"])
        if len(body) < length:
            raise PolicyFetchError("truncated response")
        body = body[:length]
    if len(body) > MAX_POLICY_BYTES:
        raise PolicyFetchError("policy larger than 64 KiB")
    return headers.get("content-type", ""), body.decode("utf-8", "replace")


def _unchunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise PolicyFetchError("invalid chunked encoding") from None
        if not sep or size == 0:
            return out
        out, body = out + rest[:size], rest[size + 2:]


async def check_mta_sts(resolver: dns.asyncresolver.Resolver, domain: str,
                        mx_hosts: Sequence[str] | None, fetcher: PolicyFetcher) -> Finding:
    name = f"_mta-sts.{domain}"
    try:
        found = [t for t in await txt_records(resolver, name)
                 if t.lstrip().startswith("v=STSv1")]
    except DnsFailure as failure:
        return _missing_or_failed("MTA-STS record", failure)
    if len(found) != 1:
        return failed(f"{len(found) or 'no'} MTA-STS records (v=STSv1) at {name}"
                      + ("; senders treat several as none" if found else ""))
    try:
        policy_id = parse_sts_txt(found[0])
    except TagError as exc:
        return failed(f"invalid MTA-STS record: {exc}")
    host = f"mta-sts.{domain}"
    try:
        policy_addresses = await addresses(resolver, host)
    except DnsFailure as failure:
        return failed(f"policy host lookup failed: {failure}", id=policy_id)
    if not policy_addresses:
        return failed(f"policy host {host} has no A/AAAA address", id=policy_id)
    problems = []
    for address in policy_addresses:
        try:
            content_type, text = await fetcher.fetch(host, address)
            break
        except TimeoutError:
            problems.append(f"{address}: no answer within {fetcher.timeout:g}s")
        except (OSError, PolicyFetchError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"{address}: {exc}")
    else:
        return failed(f"fetching https://{host}/.well-known/mta-sts.txt failed: "
                      + "; ".join(problems), id=policy_id)
    if content_type.split(";")[0].strip().lower() != "text/plain":
        return failed(f"policy served as {content_type!r}; RFC 8461 requires text/plain",
                      id=policy_id)
    try:
        policy = parse_sts_policy(text)
    except TagError as exc:
        return failed(f"invalid MTA-STS policy: {exc}", id=policy_id)
    details = {"id": policy_id, "mode": policy.mode, "max_age": policy.max_age,
               "mx": list(policy.mx)}
    if policy.mode == "none":
        return passed("MTA-STS policy mode none (withdrawn)", **details)
    if mx_hosts is None:
        return failed("cannot compare the policy with MX hosts: the MX lookup failed",
                      **details)
    uncovered = [h for h in mx_hosts if not any(mx_matches(p, h) for p in policy.mx)]
    if uncovered:
        return failed(f"MX host(s) {', '.join(uncovered)} match none of the policy's mx "
                      f"patterns ({', '.join(policy.mx)}): senders enforcing it will not "
                      "deliver there", **details)
    return passed(f"MTA-STS policy {policy.mode}, id {policy_id}, covers every MX host",
                  **details)


# --------------------------------------------------------------------------- DANE and FCrDNS

_TLSA_DIGEST_BYTES = {1: 32, 2: 64}


def tlsa_problem(usage: int, selector: int, mtype: int, data: bytes) -> str:
    """Why a TLSA record cannot be used (RFC 6698, RFC 7672), or "" when it can."""
    if usage > 3 or selector > 1 or mtype > 2:
        return f"unknown parameters {usage} {selector} {mtype}"
    if mtype in _TLSA_DIGEST_BYTES and len(data) != _TLSA_DIGEST_BYTES[mtype]:
        return f"digest of {len(data)} bytes for matching type {mtype}"
    if not data:
        return "empty certificate association data"
    return ""


async def check_tlsa(resolver: dns.asyncresolver.Resolver,
                     mx_hosts: Sequence[str] | None) -> Finding:
    if mx_hosts is None:
        return failed("no MX hosts to check: the MX check found none")
    if not mx_hosts:
        return failed("no MX hosts to check")
    names = [f"_25._tcp.{h}" for h in mx_hosts]
    results = await asyncio.gather(*(lookup(resolver, n, "TLSA") for n in names),
                                   return_exceptions=True)
    problems: list[str] = []
    usable: dict[str, int] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, DnsFailure):
            problems.append(f"no TLSA record at {name}" if result.missing else str(result))
            continue
        if isinstance(result, BaseException):
            raise result
        bad = [p for r in result if (p := tlsa_problem(r.usage, r.selector, r.mtype, r.cert))]
        usable[name] = len(result) - len(bad)
        if not usable[name]:
            problems.append(f"{name}: no usable TLSA record ({'; '.join(bad)})")
    if problems:
        return failed("; ".join(problems), usable=usable)
    return passed(f"TLSA records for all {len(names)} MX host(s)", usable=usable)


async def confirm_ip(resolver: dns.asyncresolver.Resolver, ip: str) -> str:
    """"" when `ip`'s PTR name resolves back to it, else why not."""
    import dns.reversename

    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    try:
        names = [_normalize(r.target.to_text())
                 for r in await lookup(resolver, dns.reversename.from_address(ip).to_text(),
                                       "PTR")]
    except DnsFailure as failure:
        return f"{ip}: no PTR record ({failure})" if failure.missing else f"{ip}: {failure}"
    rdtype = "A" if address.version == 4 else "AAAA"
    seen: list[str] = []
    for name in names:
        try:
            forward = [ipaddress.ip_address(r.address) for r in
                       await lookup(resolver, name, rdtype)]
        except DnsFailure as failure:
            seen.append(f"{name} ({'no ' + rdtype if failure.missing else failure})")
            continue
        if address in forward:
            return ""
        seen.append(f"{name} -> {', '.join(map(str, forward))}")
    return f"{ip}: PTR does not resolve back to the IP: {'; '.join(seen)}"


async def check_fcrdns(resolver: dns.asyncresolver.Resolver, ips: Sequence[str]) -> Finding:
    problems = [p for p in await asyncio.gather(*(confirm_ip(resolver, ip) for ip in ips)) if p]
    if problems:
        return failed("; ".join(problems), failing=len(problems), checked=len(ips))
    return passed(f"all {len(ips)} sending IP(s) forward-confirmed", checked=len(ips))


# --------------------------------------------------------------------------- one domain


@dataclass
class DomainReport:
    domain: str
    checks: dict[str, Finding]  # check name -> finding, for the configured checks
    dkim: dict[str, Finding]  # selector -> finding
    duration: float


async def _guarded(check: Awaitable[Finding], what: str) -> Finding:
    """A check that raised still gives a finding (and a logged traceback), never a crash."""
    try:
        return await check
    except Exception as exc:
        log.exception("mail DNS check crashed", extra={"check": what})
        return failed(f"check crashed: {type(exc).__name__}: {exc}")


async def check_domain(resolver: dns.asyncresolver.Resolver, domain: DomainSettings,
                       fetcher: PolicyFetcher) -> DomainReport:
    """Runs the domain's configured checks: MX first, then the others concurrently."""
    start = time.perf_counter()
    name = domain.name
    mx = await _guarded(check_mx(resolver, name), f"{name}/mx")
    hosts: list[str] | None = mx.details.get("hosts")
    jobs: dict[str, Awaitable[Finding]] = {
        "spf": check_spf(resolver, name),
        "dmarc": check_dmarc(resolver, name),
    }
    if domain.mta_sts:
        jobs["mta_sts"] = check_mta_sts(resolver, name, hosts, fetcher)
    if domain.dane:
        jobs["tlsa"] = check_tlsa(resolver, hosts)
    if domain.sending_ips:
        jobs["fcrdns"] = check_fcrdns(resolver, domain.sending_ips)
    for selector in domain.dkim_selectors:
        jobs[f"dkim:{selector}"] = check_dkim(resolver, name, selector)
    results = await asyncio.gather(*(_guarded(job, f"{name}/{key}")
                                     for key, job in jobs.items()))
    found = dict(zip(jobs, results, strict=True))
    dkim = {key.split(":", 1)[1]: f for key, f in found.items() if key.startswith("dkim:")}
    checks = {"mx": mx, **{k: f for k, f in found.items() if not k.startswith("dkim:")}}
    if dkim:
        bad = [f.reason for f in dkim.values() if not f.ok]
        checks["dkim"] = Finding(not bad, "; ".join(bad) or
                                 f"keys present for {len(dkim)} selector(s)", {})
    ordered = {c: checks[c] for c in domain.checks()}
    return DomainReport(name, ordered, dkim, time.perf_counter() - start)


# --------------------------------------------------------------------------- the engine


@dataclass
class DnsReport:
    domains: dict[str, DomainReport]

    def failing(self) -> dict[str, str]:
        """"domain/check" -> reason for every failing check."""
        return {f"{d.domain}/{c}": f.reason for d in self.domains.values()
                for c, f in d.checks.items() if not f.ok}

    def total(self) -> int:
        return sum(len(d.checks) for d in self.domains.values())


class DnsChecks:
    """Runs the mail DNS checks every interval; the collector "dns" reads the last run."""

    name = "dns"

    def __init__(self, settings: DnsSettings):
        load_dnspython()
        self.settings = settings
        self.periodic: Periodic[DnsReport] = Periodic(
            "dns", self.run, settings.interval, settings.interval)

    def start(self) -> None:
        self.periodic.start()

    async def stop(self) -> None:
        await self.periodic.stop()

    async def run(self) -> DnsReport:
        settings = self.settings
        resolver = make_resolver(settings.nameservers, settings.port, settings.timeout)
        fetcher = PolicyFetcher.build(settings.mta_sts_ca_file, settings.mta_sts_port,
                                      settings.timeout)
        limit = asyncio.Semaphore(DOMAIN_CONCURRENCY)

        async def one(domain: DomainSettings) -> DomainReport:
            async with limit:
                return await check_domain(resolver, domain, fetcher)

        reports = await asyncio.gather(*(one(d) for d in settings.domains))
        report = DnsReport({r.domain: r for r in reports})
        self._log_changes(report)
        return report

    def _log_changes(self, report: DnsReport) -> None:
        before = self.periodic.last.value
        was_failing = before.failing() if before is not None else {}
        now_failing = report.failing()
        for key, reason in now_failing.items():
            if was_failing.get(key) != reason:
                log.warning("mail DNS check failing", extra={"check": key, "reason": reason})
        for key in was_failing.keys() - now_failing.keys():
            log.info("mail DNS check passes again", extra={"check": key})

    # --- scrape time

    def collect(self) -> Iterator[Metric]:
        outcome = self.periodic.last
        if outcome.runs == 0:
            return
        success = catalogue.family("a3mailer_dns_check_success")
        dmarc = catalogue.family("a3mailer_dns_dmarc_policy")
        mode = catalogue.family("a3mailer_dns_mta_sts_mode")
        dkim = catalogue.family("a3mailer_dns_dkim_success")
        lookups = catalogue.family("a3mailer_dns_spf_lookups")
        duration = catalogue.family("a3mailer_dns_check_duration_seconds")
        report = outcome.value
        if report is None:  # the run failed as a whole: every configured check failed
            for domain in self.settings.domains:
                for check in domain.checks():
                    success.add_metric([domain.name, check], 0.0)
                for selector in domain.dkim_selectors:
                    dkim.add_metric([domain.name, selector], 0.0)
        else:
            for d in report.domains.values():
                for check, finding in d.checks.items():
                    success.add_metric([d.domain, check], 1.0 if finding.ok else 0.0)
                for selector, finding in d.dkim.items():
                    dkim.add_metric([d.domain, selector], 1.0 if finding.ok else 0.0)
                policy = d.checks["dmarc"].details.get("policy")
                for p in DMARC_POLICIES:
                    dmarc.add_metric([d.domain, p], 1.0 if p == policy else 0.0)
                if "mta_sts" in d.checks:
                    current = d.checks["mta_sts"].details.get("mode")
                    for m in MTA_STS_MODES:
                        mode.add_metric([d.domain, m], 1.0 if m == current else 0.0)
                if "lookups" in d.checks["spf"].details:
                    lookups.add_metric([d.domain], float(d.checks["spf"].details["lookups"]))
                duration.add_metric([d.domain], d.duration)
        yield from (success, dmarc, mode, dkim, lookups, duration)
        yield catalogue.single("a3mailer_dns_last_run_timestamp_seconds",
                               outcome.started + outcome.duration)

    async def health_check(self) -> CheckResult:
        """Healthy when every check passed at the last run; degraded otherwise."""
        outcome = self.periodic.last
        if outcome.runs == 0:
            return CheckResult(Status.UNKNOWN, "waiting for the first mail DNS run")
        if outcome.value is None:
            return CheckResult(Status.DEGRADED, f"the last mail DNS run failed: {outcome.error}")
        failing = outcome.value.failing()
        total = outcome.value.total()
        if failing:
            shown = "; ".join(f"{k}: {v}" for k, v in list(failing.items())[:3])
            more = f" (+{len(failing) - 3} more)" if len(failing) > 3 else ""
            return CheckResult(Status.DEGRADED,
                               f"{len(failing)} of {total} mail DNS checks failing: {shown}{more}",
                               {"failing": failing, "last_run": outcome.started})
        return CheckResult(Status.HEALTHY, f"all {total} mail DNS checks passed",
                           {"last_run": outcome.started})
