"""DNS blocklist (DNSBL) checks of the configured sending IPs (monitoring.dnsbl).

For each IP and zone the query name is the IP reversed (IPv4 octets, IPv6
nibbles, RFC 5782 §2) under the zone: 192.0.2.10 in zen.spamhaus.org is
10.2.0.192.zen.spamhaus.org. Answers:

- NXDOMAIN (or no A record): not listed.
- A records in 127.0.0.0/8: listed (the last octet is the list's return code).
- A record in 127.255.255.0/24: the list operator refused or blocked the query
  (Spamhaus: .252 mistyped zone, .254 query through a public/open resolver,
  .255 too many queries). Reported as an error, never as listed or clean.
- Any address outside 127.0.0.0/8: an error (a dead zone whose domain was
  parked often answers everything with a web server's address).
- Timeouts and failures (SERVFAIL, REFUSED): errors.

With `test_points` (default on) every zone is also asked for the RFC 5782
§5 test addresses each run: 127.0.0.2 must be listed and 127.0.0.1 must not.
A mistyped or retired zone answers NXDOMAIN for everything and would otherwise
look clean forever; a zone that lists everything would look like a listing.

Default zones (DEFAULT_ZONES), widely used and free for low-volume use through
your own resolver: zen.spamhaus.org (Spamhaus SBL+XBL+PBL; blocks queries via
public resolvers, commercial or high volume use needs their DQS service),
bl.spamcop.net, b.barracudacentral.org (free, but the querying resolver's IP
must be registered with Barracuda), psbl.surriel.com and bl.mailspike.net.
Metrics label the configured set name, never an IP (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from exporter import catalogue
from exporter.health import CheckResult, Status
from exporter.probes.dns import load_dnspython, make_resolver, servers_said
from exporter.schedule import Periodic

if TYPE_CHECKING:
    import dns.asyncresolver
    from prometheus_client.core import Metric

log = logging.getLogger(__name__)

DEFAULT_ZONES = (
    "zen.spamhaus.org",
    "bl.spamcop.net",
    "b.barracudacentral.org",
    "psbl.surriel.com",
    "bl.mailspike.net",
)
QUERY_CONCURRENCY = 16
TEST_LISTED, TEST_NOT_LISTED = "127.0.0.2", "127.0.0.1"  # RFC 5782 §5

_LISTED_RANGE = ipaddress.IPv4Network("127.0.0.0/8")
_REFUSED_RANGE = ipaddress.IPv4Network("127.255.255.0/24")
_REFUSED_CODES = {
    "127.255.255.252": "the zone name is mistyped",
    "127.255.255.254": "the query came through a public or open resolver",
    "127.255.255.255": "too many queries",
}

LISTED, CLEAN, ERROR = "listed", "clean", "error"


class Verdict(NamedTuple):
    """One IP in one zone: listed, clean or error, why, and the return codes."""

    status: str
    reason: str
    codes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class IpSet:
    name: str
    ips: tuple[str, ...]


@dataclass(frozen=True)
class DnsblSettings:
    interval: float = 900.0
    timeout: float = 5.0
    nameservers: tuple[str, ...] = ()
    port: int = 53
    zones: tuple[str, ...] = DEFAULT_ZONES
    ip_sets: tuple[IpSet, ...] = ()
    test_points: bool = True

    @classmethod
    def from_config(cls, section: Mapping[str, Any],
                    seconds: Callable[[str], float]) -> DnsblSettings:
        """From the validated monitoring.dnsbl section; `seconds` parses durations."""
        return cls(
            interval=seconds(section["interval"]),
            timeout=seconds(section["timeout"]),
            nameservers=tuple(section["nameservers"]),
            port=int(section["port"]),
            zones=tuple(z.strip().rstrip(".").lower() for z in section["zones"]),
            ip_sets=tuple(IpSet(s["name"], tuple(s["ips"])) for s in section["ip_sets"]),
            test_points=bool(section.get("test_points", True)),
        )


# --------------------------------------------------------------------------- queries


def query_name(ip: str, zone: str) -> str:
    """The DNSBL query name: reversed IPv4 octets or IPv6 nibbles, then the zone.

    Raises ValueError when `ip` is not an IP address.
    """
    address = ipaddress.ip_address(ip.strip())
    if address.version == 4:
        labels = str(address).split(".")
    else:
        labels = list(address.exploded.replace(":", ""))
    return ".".join([*reversed(labels), zone.strip().rstrip(".")])


def interpret(answers: Sequence[str]) -> Verdict:
    """What the A records of a query name mean ([] = NXDOMAIN or no A = not listed)."""
    if not answers:
        return Verdict(CLEAN, "not listed")
    codes = tuple(sorted(answers))
    try:
        parsed = [ipaddress.IPv4Address(a) for a in codes]
    except ValueError:
        return Verdict(ERROR, f"unexpected answer {', '.join(codes)}", codes)
    refused = [a for a in parsed if a in _REFUSED_RANGE]
    if refused:
        why = _REFUSED_CODES.get(str(refused[0]), "refused or blocked by the list operator")
        return Verdict(ERROR, f"the list refused the query ({refused[0]}: {why})", codes)
    outside = [a for a in parsed if a not in _LISTED_RANGE]
    if outside:
        return Verdict(ERROR, f"unexpected answer {outside[0]} outside 127.0.0.0/8 "
                       "(a dead or parked zone?)", codes)
    return Verdict(LISTED, f"listed ({', '.join(codes)})", codes)


async def check_ip(resolver: dns.asyncresolver.Resolver, ip: str, zone: str) -> Verdict:
    """Looks `ip` up in `zone`; never raises."""
    import dns.exception  # loaded by load_dnspython(); bound here
    import dns.resolver

    try:
        name = query_name(ip, zone)
    except ValueError:
        return Verdict(ERROR, f"{ip!r} is not an IP address")
    try:
        answer = await resolver.resolve(name, "A", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Verdict(CLEAN, "not listed")
    except dns.exception.Timeout:
        return Verdict(ERROR, f"{name}: no answer within {resolver.lifetime:g}s (timed out)")
    except dns.resolver.NoNameservers as exc:
        return Verdict(ERROR, f"{name}: {servers_said(exc)}")
    except dns.exception.DNSException as exc:
        return Verdict(ERROR, f"{name}: {exc}")
    return interpret([r.address for r in answer])


class ZoneSanity(NamedTuple):
    """The RFC 5782 §5 test points of a zone: "" or why the zone's answers are suspect."""

    problem: str = ""
    lists_everything: bool = False


async def check_test_points(resolver: dns.asyncresolver.Resolver, zone: str) -> ZoneSanity:
    """The zone must list 127.0.0.2 and must not list 127.0.0.1 (RFC 5782 §5)."""
    listed, not_listed = await asyncio.gather(check_ip(resolver, TEST_LISTED, zone),
                                              check_ip(resolver, TEST_NOT_LISTED, zone))
    for verdict in (listed, not_listed):
        if verdict.status == ERROR:
            return ZoneSanity(verdict.reason)
    if not_listed.status == LISTED:
        return ZoneSanity(f"the zone lists {TEST_NOT_LISTED}, which no DNSBL may list "
                          "(RFC 5782): it answers for every address, listings ignored", True)
    if listed.status != LISTED:
        return ZoneSanity(f"the zone does not list the RFC 5782 test address {TEST_LISTED}: "
                          "a mistyped or retired zone?")
    return ZoneSanity()


# --------------------------------------------------------------------------- the engine


@dataclass
class ZoneResult:
    """One configured IP set in one zone. `ips` (IP -> verdict) is for the API, not labels."""

    ip_set: str
    zone: str
    listed_ips: int
    success: bool
    reason: str
    ips: dict[str, Verdict]


@dataclass
class DnsblReport:
    results: list[ZoneResult]

    def problems(self) -> dict[str, str]:
        """"ip_set/zone" -> reason for every listing or failed check."""
        return {f"{r.ip_set}/{r.zone}": r.reason for r in self.results
                if r.listed_ips or not r.success}


class Dnsbl:
    """Checks the configured IP sets against the zones every interval; the collector
    "dnsbl" reads the last run."""

    name = "dnsbl"

    def __init__(self, settings: DnsblSettings):
        load_dnspython()
        self.settings = settings
        self.periodic: Periodic[DnsblReport] = Periodic(
            "dnsbl", self.run, settings.interval, settings.interval)

    def start(self) -> None:
        self.periodic.start()

    async def stop(self) -> None:
        await self.periodic.stop()

    async def run(self) -> DnsblReport:
        settings = self.settings
        resolver = make_resolver(settings.nameservers, settings.port, settings.timeout)
        limit = asyncio.Semaphore(QUERY_CONCURRENCY)

        async def bounded_ip(ip: str, zone: str) -> Verdict:
            async with limit:
                return await check_ip(resolver, ip, zone)

        async def bounded_zone(zone: str) -> ZoneSanity:
            async with limit:
                return await check_test_points(resolver, zone)

        pairs = sorted({(ip, zone) for s in settings.ip_sets for ip in s.ips
                        for zone in settings.zones})
        zones = list(settings.zones) if settings.test_points else []
        verdicts, sanity = await asyncio.gather(
            asyncio.gather(*(bounded_ip(ip, zone) for ip, zone in pairs)),
            asyncio.gather(*(bounded_zone(zone) for zone in zones)))
        by_pair = dict(zip(pairs, verdicts, strict=True))
        zone_sanity = dict(zip(zones, sanity, strict=True))
        results = []
        for ip_set in settings.ip_sets:
            for zone in settings.zones:
                ips = {ip: by_pair[(ip, zone)] for ip in ip_set.ips}
                zone_check = zone_sanity.get(zone, ZoneSanity())
                listed = [] if zone_check.lists_everything else [
                    ip for ip, v in ips.items() if v.status == LISTED]
                errors = list(dict.fromkeys(  # one line per distinct reason
                    [zone_check.problem] * bool(zone_check.problem)
                    + [v.reason for v in ips.values() if v.status == ERROR]))
                parts = ([f"{len(listed)} of {len(ips)} IP(s) listed"] if listed else []) + errors
                results.append(ZoneResult(ip_set.name, zone, len(listed), not errors,
                                          "; ".join(parts) or "not listed", ips))
        report = DnsblReport(results)
        self._log_changes(report)
        return report

    def _log_changes(self, report: DnsblReport) -> None:
        before = self.periodic.last.value
        was = before.problems() if before is not None else {}
        now = report.problems()
        for key, reason in now.items():
            if was.get(key) != reason:
                log.warning("DNSBL listing or check failure", extra={"check": key,
                                                                     "reason": reason})
        for key in was.keys() - now.keys():
            log.info("DNSBL check clean again", extra={"check": key})

    # --- scrape time

    def collect(self) -> Iterator[Metric]:
        outcome = self.periodic.last
        if outcome.runs == 0:
            return
        listed = catalogue.family("a3mailer_dnsbl_listed")
        count = catalogue.family("a3mailer_dnsbl_listed_ips")
        success = catalogue.family("a3mailer_dnsbl_check_success")
        report = outcome.value
        if report is None:  # the run failed as a whole: every check failed
            for ip_set in self.settings.ip_sets:
                for zone in self.settings.zones:
                    success.add_metric([ip_set.name, zone], 0.0)
        else:
            for r in report.results:
                labels = [r.ip_set, r.zone]
                listed.add_metric(labels, 1.0 if r.listed_ips else 0.0)
                count.add_metric(labels, float(r.listed_ips))
                success.add_metric(labels, 1.0 if r.success else 0.0)
        yield from (listed, count, success)
        yield catalogue.single("a3mailer_dnsbl_last_run_timestamp_seconds",
                               outcome.started + outcome.duration)

    async def health_check(self) -> CheckResult:
        """Healthy when no IP is listed and every query was answered at the last run."""
        outcome = self.periodic.last
        if outcome.runs == 0:
            return CheckResult(Status.UNKNOWN, "waiting for the first DNSBL run")
        if outcome.value is None:
            return CheckResult(Status.DEGRADED, f"the last DNSBL run failed: {outcome.error}")
        problems = outcome.value.problems()
        if problems:
            shown = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:3])
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            return CheckResult(Status.DEGRADED, f"{shown}{more}",
                               {"problems": problems, "last_run": outcome.started})
        checked = len(outcome.value.results)
        return CheckResult(Status.HEALTHY, f"no listing in {checked} set/zone check(s)",
                           {"last_run": outcome.started})
