"""Mail DNS and DNSBL checks against a real NSD on loopback.

Every name the checks ask for lives in zones served by our own NSD on
127.0.0.1:<free port>; the MTA-STS policy host resolves (through that NSD) to
127.0.0.1 where a local HTTPS server with a throwaway CA answers. Nothing is
sent beyond loopback: the DNSBL default zones are never configured here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collectors import Scrape
from exporter.health import Status
from exporter.probes.dns import DnsChecks, DnsSettings, DomainSettings
from exporter.probes.dnsbl import DEFAULT_ZONES, Dnsbl, DnsblSettings, IpSet
from tests.integration.components import LOOPBACK
from tests.integration.dns_server import (
    DelayedDnsServer,
    Nsd,
    PolicyHttpsServer,
    SilentDnsServer,
    closed_udp_port,
    make_test_ca,
)

RSA_KEY = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDXnuNX9dwBAepVj/AQMEvf4JQx+/WoHgO0OYdacgk6gf7dywtq"
    "qYPn4OyEEH00XERTi1PKqqMaWDLkjgf2hKkUhlRaO8MyBE0i6HpNwykYhjzXh1SQbY0SDZS0wHUlfQH5UTg6pshh"
    "EcInmnXHxMqn0LQkynLuVo49y1e+BiW0OQIDAQAB"
)
DIGEST = "0123456789abcdef" * 4

TEST_ZONE = f"""$ORIGIN test.
$TTL 60
@                   SOA   ns.test. hostmaster.test. 1 3600 600 86400 60
@                   NS    ns.test.
ns                  A     127.0.0.1

; good.test: every check passes
good                MX    10 mx1.good
good                MX    20 mx2.good
mx1.good            A     192.0.2.10
mx2.good            AAAA  2001:db8::10
good                TXT   "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 include:_spf.good.test -all"
good                TXT   "site-verification=abc123"
_spf.good           TXT   "v=spf1 a:mx1.good.test mx ~all"
_dmarc.good         TXT   "v=DMARC1; p=reject; rua=mailto:dmarc@good.test; pct=100"
sel1._domainkey.good TXT  ( "v=DKIM1; k=rsa; p={RSA_KEY[:100]}" "{RSA_KEY[100:]}" )
sel2._domainkey.good TXT  "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
_mta-sts.good       TXT   "v=STSv1; id=20240101T000000"
mta-sts.good        A     127.0.0.1
_25._tcp.mx1.good   TLSA  3 1 1 {DIGEST}
_25._tcp.mx2.good   TLSA  2 0 1 {DIGEST}

; broken.test: no MX, two SPF records, no DMARC, no DKIM key, no MTA-STS record
broken              A     192.0.2.50
broken              TXT   "v=spf1 ip4:192.0.2.0/24 -all"
broken              TXT   "v=spf1 mx -all"

; mismatch.test: SPF syntax error, invalid DMARC, revoked DKIM key, MTA-STS policy
; not covering the MX, no TLSA, sending IPs not forward-confirmed
mismatch            MX    10 mx.mismatch
mx.mismatch         A     192.0.2.20
mail.mismatch       A     192.0.2.99
mismatch            TXT   "v=spf1 ip4:192.0.2.300 -all"
_dmarc.mismatch     TXT   "v=DMARC1; p=bogus"
sel1._domainkey.mismatch TXT "v=DKIM1; p="
_mta-sts.mismatch   TXT   "v=STSv1; id=2"
mta-sts.mismatch    A     127.0.0.1

; toomany.test: 13 DNS-querying SPF terms across includes; DMARC quarantine
toomany             MX    10 mx1.good.test.
toomany             TXT   "v=spf1 include:s1.toomany.test include:s2.toomany.test -all"
s1.toomany TXT "v=spf1 a mx ptr exists:%{{i}}.x.toomany.test include:s3.toomany.test ~all"
s2.toomany          TXT   "v=spf1 a mx a:x.toomany.test mx:y.toomany.test ~all"
s3.toomany          TXT   "v=spf1 a mx ?all"
_dmarc.toomany      TXT   "v=DMARC1; p=quarantine"

; DNSBL zones
2.0.0.127.bl        A     127.0.0.2
10.2.0.192.bl       A     127.0.0.2
10.2.0.192.bl       TXT   "listed: see https://bl.test/lookup"
5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl A 127.0.0.4
2.0.0.127.clean     A     127.0.0.2
*.refused           A     127.255.255.254
*.wild              A     127.0.0.2
"""

REVERSE_V4 = """$ORIGIN 2.0.192.in-addr.arpa.
$TTL 60
@    SOA ns.test. hostmaster.test. 1 3600 600 86400 60
@    NS  ns.test.
10   PTR mx1.good.test.
20   PTR mail.mismatch.test.
"""

REVERSE_V6 = """$ORIGIN 8.b.d.0.1.0.0.2.ip6.arpa.
$TTL 60
@    SOA ns.test. hostmaster.test. 1 3600 600 86400 60
@    NS  ns.test.
0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 PTR mx2.good.test.
"""

POLICIES = {
    "mta-sts.good.test": (200, "text/plain",
                          "version: STSv1\r\nmode: enforce\r\nmx: mx1.good.test\r\n"
                          "mx: *.good.test\r\nmax_age: 86400\r\n"),
    "mta-sts.mismatch.test": (200, "text/plain; charset=utf-8",
                              "version: STSv1\nmode: testing\nmx: *.other.test\nmax_age: 3600\n"),
}

GOOD = DomainSettings("good.test", dkim_selectors=("sel1", "sel2"),
                      sending_ips=("192.0.2.10", "2001:db8::10"))
BROKEN = DomainSettings("broken.test", dkim_selectors=("sel1",))
MISMATCH = DomainSettings("mismatch.test", dkim_selectors=("sel1",),
                          sending_ips=("192.0.2.20", "192.0.2.21"))
TOOMANY = DomainSettings("toomany.test", mta_sts=False, dane=False)
GONE = DomainSettings("gone.test", mta_sts=False, dane=False)
REFUSED = DomainSettings("example.invalid", mta_sts=False, dane=False)


@pytest.fixture(scope="module")
def nsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nsd]:
    server = Nsd(tmp_path_factory.mktemp("nsd"), {
        "test": TEST_ZONE, "2.0.192.in-addr.arpa": REVERSE_V4,
        "8.b.d.0.1.0.0.2.ip6.arpa": REVERSE_V6})
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def policy_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_test_ca(tmp_path_factory.mktemp("ca"), list(POLICIES))


@pytest.fixture(scope="module")
def policy_server(policy_ca: tuple[Path, Path, Path]) -> Iterator[PolicyHttpsServer]:
    _, cert, key = policy_ca
    with PolicyHttpsServer(cert, key, POLICIES) as server:
        yield server


def dns_settings(nsd_port: int, domains: tuple[DomainSettings, ...], *, ca_file: str = "",
                 policy_port: int = 443, timeout: float = 2.0) -> DnsSettings:
    return DnsSettings(interval=60, timeout=timeout, nameservers=(LOOPBACK,), port=nsd_port,
                       domains=domains, mta_sts_ca_file=ca_file, mta_sts_port=policy_port)


@pytest.fixture
def local_dns(nsd: Nsd, policy_ca: tuple[Path, Path, Path],
              policy_server: PolicyHttpsServer) -> Any:
    """Builds DnsChecks against our NSD and our policy server."""

    def build(*domains: DomainSettings, **kwargs: Any) -> DnsChecks:
        kwargs.setdefault("ca_file", str(policy_ca[0]))
        kwargs.setdefault("policy_port", policy_server.port)
        return DnsChecks(dns_settings(nsd.port, domains, **kwargs))

    return build


def samples(collector: Any) -> dict[tuple[str, tuple[str, ...]], float]:
    """{(sample name, label values): value} of what a collector emits now."""
    return {(s.name, tuple(s.labels.values())): s.value
            for family in collector.collect() for s in family.samples}


def success(values: dict[tuple[str, tuple[str, ...]], float], domain: str, check: str) -> float:
    return values[("a3mailer_dns_check_success", (domain, check))]


# --------------------------------------------------------------------------- mail DNS


async def test_good_domain_passes_every_check(local_dns: Any,
                                              policy_server: PolicyHttpsServer) -> None:
    checks = local_dns(GOOD)
    outcome = await checks.periodic.once()
    assert outcome.ok, outcome.error
    report = outcome.value.domains["good.test"]
    assert {c: f.ok for c, f in report.checks.items()} == dict.fromkeys(
        ["mx", "spf", "dmarc", "dkim", "mta_sts", "tlsa", "fcrdns"], True), report.checks
    assert report.checks["mx"].details["hosts"] == ["mx1.good.test", "mx2.good.test"]
    assert report.checks["spf"].details["lookups"] == 3
    assert report.checks["mta_sts"].details["mode"] == "enforce"
    assert "mta-sts.good.test" in policy_server.hosts

    values = samples(checks)
    for check in ("mx", "spf", "dmarc", "dkim", "mta_sts", "tlsa", "fcrdns"):
        assert success(values, "good.test", check) == 1.0
    assert values[("a3mailer_dns_dmarc_policy", ("good.test", "reject"))] == 1.0
    assert values[("a3mailer_dns_dmarc_policy", ("good.test", "none"))] == 0.0
    assert values[("a3mailer_dns_mta_sts_mode", ("good.test", "enforce"))] == 1.0
    assert values[("a3mailer_dns_dkim_success", ("good.test", "sel1"))] == 1.0
    assert values[("a3mailer_dns_dkim_success", ("good.test", "sel2"))] == 1.0
    assert values[("a3mailer_dns_spf_lookups", ("good.test",))] == 3.0
    assert values[("a3mailer_dns_last_run_timestamp_seconds", ())] > time.time() - 60
    health = await checks.health_check()
    assert health.status is Status.HEALTHY, health.message


async def test_broken_domains_fail_with_reasons(local_dns: Any) -> None:
    checks = local_dns(BROKEN, MISMATCH, TOOMANY)
    outcome = await checks.periodic.once()
    assert outcome.ok, outcome.error
    broken = outcome.value.domains["broken.test"].checks
    assert not any(f.ok for f in broken.values())
    assert "no MX record" in broken["mx"].reason
    assert "2 SPF records" in broken["spf"].reason
    assert "no DMARC record" in broken["dmarc"].reason
    assert "sel1" in broken["dkim"].reason and "NXDOMAIN" in broken["dkim"].reason
    assert "no MTA-STS record" in broken["mta_sts"].reason
    assert "no MX hosts" in broken["tlsa"].reason

    mismatch = outcome.value.domains["mismatch.test"].checks
    assert mismatch["mx"].ok
    assert "invalid address" in mismatch["spf"].reason
    assert "p=bogus" in mismatch["dmarc"].reason
    assert "revoked" in mismatch["dkim"].reason
    assert "mx.mismatch.test match none of the policy's mx patterns (*.other.test)" in (
        mismatch["mta_sts"].reason)
    assert "no TLSA record at _25._tcp.mx.mismatch.test" in mismatch["tlsa"].reason
    assert "192.0.2.20: PTR does not resolve back" in mismatch["fcrdns"].reason
    assert "mail.mismatch.test -> 192.0.2.99" in mismatch["fcrdns"].reason
    assert "192.0.2.21: no PTR record" in mismatch["fcrdns"].reason
    assert not any(f.ok for c, f in mismatch.items() if c != "mx")

    toomany = outcome.value.domains["toomany.test"].checks
    assert "more than 10 DNS-querying terms" in toomany["spf"].reason
    assert toomany["dmarc"].ok

    values = samples(checks)
    for check in ("mx", "spf", "dmarc", "dkim", "mta_sts", "tlsa"):
        assert success(values, "broken.test", check) == 0.0
    assert ("a3mailer_dns_check_success", ("broken.test", "fcrdns")) not in values
    for check in ("spf", "dmarc", "dkim", "mta_sts", "tlsa", "fcrdns"):
        assert success(values, "mismatch.test", check) == 0.0
    assert success(values, "mismatch.test", "mx") == 1.0
    assert all(values[("a3mailer_dns_dmarc_policy", ("mismatch.test", p))] == 0.0
               for p in ("none", "quarantine", "reject"))
    assert values[("a3mailer_dns_mta_sts_mode", ("mismatch.test", "testing"))] == 1.0
    assert values[("a3mailer_dns_dkim_success", ("broken.test", "sel1"))] == 0.0
    assert values[("a3mailer_dns_dmarc_policy", ("toomany.test", "quarantine"))] == 1.0
    assert values[("a3mailer_dns_spf_lookups", ("toomany.test",))] == 11.0
    assert success(values, "toomany.test", "spf") == 0.0

    health = await checks.health_check()
    assert health.status is Status.DEGRADED
    assert health.details["failing"]["broken.test/mx"].startswith("no MX record")


async def test_nxdomain_and_refused(local_dns: Any) -> None:
    checks = local_dns(GONE, REFUSED)
    outcome = await checks.periodic.once()
    gone = outcome.value.domains["gone.test"].checks
    assert "NXDOMAIN: gone.test does not exist" in gone["mx"].reason
    assert "NXDOMAIN" in gone["spf"].reason
    refused = outcome.value.domains["example.invalid"].checks
    assert "answered REFUSED" in refused["mx"].reason
    values = samples(checks)
    assert success(values, "gone.test", "mx") == 0.0
    assert success(values, "example.invalid", "dmarc") == 0.0


async def test_policy_certificate_must_verify(local_dns: Any, tmp_path: Path) -> None:
    """Without our CA the local policy server's certificate is refused; a bad CA path
    is a clear reason too."""
    untrusted = await local_dns(GOOD, ca_file="").periodic.once()
    reason = untrusted.value.domains["good.test"].checks["mta_sts"].reason
    assert "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason
    missing = await local_dns(GOOD, ca_file=str(tmp_path / "nope.pem")).periodic.once()
    reason = missing.value.domains["good.test"].checks["mta_sts"].reason
    assert "cannot load mta_sts_ca_file" in reason


@pytest.mark.parametrize("fault", ["slow", "silent", "closed"])
async def test_unanswered_queries_time_out(nsd: Nsd, fault: str) -> None:
    """A slow resolver (answers correctly, 3 s late), one that never answers, and a
    closed port: every check fails with 'timed out' within the timeout, no crash."""
    timeout = 0.5
    if fault == "slow":
        server: Any = DelayedDnsServer(nsd.port, delay=3.0)
    elif fault == "silent":
        server = SilentDnsServer()
    else:
        server = None
    port = server.port if server is not None else closed_udp_port()
    try:
        checks = DnsChecks(dns_settings(port, (GOOD,), timeout=timeout))
        start = time.monotonic()
        outcome = await checks.periodic.once()
        elapsed = time.monotonic() - start
    finally:
        if server is not None:
            server.stop()
    assert outcome.ok, outcome.error
    # MX first, then the other checks concurrently, each query bounded by the timeout
    assert elapsed < 4 * timeout + 0.5, elapsed
    findings = outcome.value.domains["good.test"].checks
    assert not any(f.ok for f in findings.values())
    assert "timed out" in findings["mx"].reason
    assert "timed out" in findings["spf"].reason
    assert "timed out" in findings["dmarc"].reason
    values = samples(checks)
    assert success(values, "good.test", "mx") == 0.0
    assert success(values, "good.test", "fcrdns") == 0.0


async def test_periodic_runs_in_background_and_scrapes(local_dns: Any) -> None:
    checks = local_dns(GOOD)
    assert list(checks.collect()) == []  # nothing before the first run
    assert (await checks.health_check()).status is Status.UNKNOWN
    checks.start()
    try:
        for _ in range(100):
            if checks.periodic.last.runs:
                break
            await asyncio.sleep(0.05)
    finally:
        await checks.stop()
    registry = CollectorRegistry()
    registry.register(Scrape([checks]))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'a3mailer_dns_check_success{check="mx",domain="good.test"} 1.0' in text
    assert 'a3mailer_exporter_collector_success{collector="dns"} 1.0' in text


# --------------------------------------------------------------------------- DNSBL


def dnsbl_settings(port: int, zones: tuple[str, ...], timeout: float = 2.0) -> DnsblSettings:
    return DnsblSettings(interval=60, timeout=timeout, nameservers=(LOOPBACK,), port=port,
                         zones=zones, ip_sets=(
                             IpSet("outbound", ("192.0.2.10", "192.0.2.11")),
                             IpSet("outbound_v6", ("2001:db8::25", "2001:db8::26")),
                         ))


async def test_dnsbl_listed_clean_and_broken_zones(nsd: Nsd) -> None:
    zones = ("bl.test", "clean.test", "refused.test", "wild.test", "nolist.test")
    assert not set(zones) & set(DEFAULT_ZONES)
    dnsbl = Dnsbl(dnsbl_settings(nsd.port, zones))
    outcome = await dnsbl.periodic.once()
    assert outcome.ok, outcome.error
    results = {(r.ip_set, r.zone): r for r in outcome.value.results}
    assert results[("outbound", "bl.test")].ips["192.0.2.10"].codes == ("127.0.0.2",)
    assert results[("outbound", "bl.test")].ips["192.0.2.11"].status == "clean"
    assert results[("outbound_v6", "bl.test")].ips["2001:db8::25"].codes == ("127.0.0.4",)
    assert "public or open resolver" in results[("outbound", "refused.test")].reason
    assert "lists 127.0.0.1" in results[("outbound", "wild.test")].reason
    assert "does not list the RFC 5782 test address" in results[("outbound", "nolist.test")].reason

    values = samples(dnsbl)

    def get(metric: str, ip_set: str, zone: str) -> float:
        return values[(f"a3mailer_dnsbl_{metric}", (ip_set, zone))]

    for ip_set in ("outbound", "outbound_v6"):
        assert get("listed", ip_set, "bl.test") == 1.0
        assert get("listed_ips", ip_set, "bl.test") == 1.0
        assert get("check_success", ip_set, "bl.test") == 1.0
        assert get("listed", ip_set, "clean.test") == 0.0
        assert get("check_success", ip_set, "clean.test") == 1.0
        assert get("listed", ip_set, "refused.test") == 0.0  # refused is not listed
        assert get("check_success", ip_set, "refused.test") == 0.0
        assert get("check_success", ip_set, "wild.test") == 0.0
        assert get("listed", ip_set, "wild.test") == 0.0  # a list of everything: ignored
        assert get("check_success", ip_set, "nolist.test") == 0.0
    assert not any("192.0.2" in "".join(labels) for _, labels in values)  # no IP labels
    health = await dnsbl.health_check()
    assert health.status is Status.DEGRADED
    assert "outbound/bl.test" in health.details["problems"]


@pytest.mark.parametrize("fault", ["slow", "silent"])
async def test_dnsbl_unanswered_queries_time_out(nsd: Nsd, fault: str) -> None:
    server: Any = (DelayedDnsServer(nsd.port, delay=3.0) if fault == "slow"
                   else SilentDnsServer())
    try:
        dnsbl = Dnsbl(dnsbl_settings(server.port, ("bl.test",), timeout=0.5))
        start = time.monotonic()
        outcome = await dnsbl.periodic.once()
        elapsed = time.monotonic() - start
    finally:
        server.stop()
    assert outcome.ok and elapsed < 1.5, (outcome.error, elapsed)
    values = samples(dnsbl)
    assert values[("a3mailer_dnsbl_check_success", ("outbound", "bl.test"))] == 0.0
    assert values[("a3mailer_dnsbl_listed", ("outbound", "bl.test"))] == 0.0
    result = next(r for r in outcome.value.results if r.ip_set == "outbound")
    assert "timed out" in result.reason
