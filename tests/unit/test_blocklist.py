"""IP allow/block lists: normalisation, most-specific match, expiry, text import/export."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security.attempts import Attempt, parse_address, parse_ip
from security.blocklist import (
    CidrSet,
    Entry,
    Lists,
    ban_network,
    export_text,
    import_text,
    parse_network,
    prefix_of,
)

NOW = 1_700_000_000.0


def test_parse_network_normalises():
    assert str(parse_network("192.0.2.7")) == "192.0.2.7/32"
    assert str(parse_network(" 2001:db8::1 ")) == "2001:db8::1/128"
    assert str(parse_network("192.0.2.1/24")) == "192.0.2.0/24"  # host bits masked
    assert str(parse_network("2001:db8::1:2/64")) == "2001:db8::/64"
    assert str(parse_network("::ffff:192.0.2.1")) == "192.0.2.1/32"
    assert str(parse_network("::ffff:192.0.2.0/120")) == "192.0.2.0/24"
    assert str(parse_network("::/0")) == "::/0"  # all of IPv6 stays IPv6


def test_a_mapped_network_is_its_ipv4_network_from_96_and_refused_below():
    assert str(parse_network("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    assert str(parse_network("::ffff:0:0/96")) == "0.0.0.0/0"
    assert str(parse_network("::ffff:1.2.3.4")) == "1.2.3.4/32"
    assert str(parse_network("::/80")) == "::/80"  # written as IPv6, it stays IPv6
    for bad in ("::ffff:0:0/95", "::ffff:10.0.0.0/80", " ::ffff:1.2.3.4/0 "):
        with pytest.raises(ValueError, match=r"needs a prefix of /96 or longer .*: '::ffff"):
            parse_network(bad)


def test_a_ban_refuses_every_address_and_the_import_reports_the_line():
    for every in ("0.0.0.0/0", "::/0", "::ffff:0:0/96", "10.1.2.3/0"):
        with pytest.raises(ValueError, match="would refuse every client"):
            ban_network(every)
    assert str(ban_network("0.0.0.0/1")) == "0.0.0.0/1"
    entries, errors = import_text("::/0\n192.0.2.1\n", "manual", NOW)
    assert [e.network for e in entries] == ["192.0.2.1/32"]
    assert errors == [(1, "'::/0' is every IPv6 address: a ban of it would refuse every "
                          "client")]


@pytest.mark.parametrize("bad", ["", "  ", "192.0.2.300", "192.0.2.0/33", "example.org", "1.2.3"])
def test_parse_network_rejects_with_the_input_in_the_message(bad):
    with pytest.raises(ValueError, match="network" if bad.strip() else "empty"):
        parse_network(bad)


def test_entry_normalises_and_checks_source():
    assert Entry("10.1.2.3/8").network == "10.0.0.0/8"
    for source in ("manual", "automatic", "config", "feed:spamhaus-drop"):
        Entry("10.0.0.0/8", source=source)
    for source in ("", "feed:", "robot"):
        with pytest.raises(ValueError, match="source"):
            Entry("10.0.0.0/8", source=source)


def test_most_specific_entry_wins_v4_and_v6():
    cidrs = CidrSet(
        [
            Entry("10.0.0.0/8", "wide"),
            Entry("10.1.0.0/16", "narrow"),
            Entry("10.1.2.3", "host"),
            Entry("2001:db8::/32", "v6 wide"),
            Entry("2001:db8:1::/48", "v6 narrow"),
        ]
    )
    assert cidrs.match("10.1.2.3", NOW).reason == "host"
    assert cidrs.match("10.1.2.4", NOW).reason == "narrow"
    assert cidrs.match("10.2.0.1", NOW).reason == "wide"
    assert cidrs.match("11.0.0.1", NOW) is None
    assert cidrs.match("2001:db8:1::5", NOW).reason == "v6 narrow"
    assert cidrs.match("2001:db8:2::5", NOW).reason == "v6 wide"
    assert cidrs.match("2001:db9::1", NOW) is None
    assert cidrs.match(ipaddress.ip_address("10.1.2.3"), NOW).reason == "host"
    # an IPv4 network never matches IPv6 addresses with the same bits
    assert cidrs.match("::a01:203", NOW) is None
    with pytest.raises(ValueError, match="not an IP address"):
        cidrs.match("10.1.2", NOW)


def test_ipv4_mapped_ipv6_matches_as_ipv4():
    cidrs = CidrSet([Entry("192.0.2.0/24", "v4")])
    assert cidrs.match("::ffff:192.0.2.9", NOW).reason == "v4"
    assert cidrs.match(ipaddress.ip_address("::ffff:192.0.2.9"), NOW).reason == "v4"
    assert cidrs.match("::ffff:198.51.100.1", NOW) is None


def test_add_replaces_remove_and_get_take_exact_networks():
    cidrs = CidrSet()
    assert cidrs.add(Entry("192.0.2.0/24", "first")) is None
    assert cidrs.add(Entry("192.0.2.9/24", "second")).reason == "first"
    assert len(cidrs) == 1
    assert cidrs.get("192.0.2.0/24").reason == "second"
    assert cidrs.remove("192.0.2.0/25") is None  # not that network
    assert cidrs.remove("192.0.2.1/24").reason == "second"
    assert len(cidrs) == 0 and cidrs.match("192.0.2.1", NOW) is None


def test_expired_entries_never_match_and_expire_returns_them():
    cidrs = CidrSet(
        [
            Entry("10.0.0.0/8", "permanent"),
            Entry("10.1.0.0/16", "short", "automatic", NOW, NOW + 60),
            Entry("2001:db8::/64", "v6 short", "automatic", NOW, NOW + 30),
        ]
    )
    assert cidrs.match("10.1.0.1", NOW + 59.9).reason == "short"
    # from `expires` on, the less specific entry shows through
    assert cidrs.match("10.1.0.1", NOW + 60).reason == "permanent"
    assert cidrs.match("2001:db8::1", NOW + 30) is None
    gone = cidrs.expire(NOW + 60)
    assert sorted(e.reason for e in gone) == ["short", "v6 short"]
    assert [e.reason for e in cidrs] == ["permanent"]
    assert cidrs.expire(NOW + 10**9) == []


def test_allow_wins_over_block_and_trusted_loopback():
    lists = Lists(
        allow=CidrSet([Entry("192.0.2.10", "office")]),
        block=CidrSet([Entry("192.0.2.0/24", "abuse"), Entry("127.0.0.0/8", "oops")]),
        trusted=CidrSet([Entry("10.0.0.1", "proxy", "config"),
                         Entry("127.0.0.0/8", "loopback", "config"),
                         Entry("::1", "loopback", "config")]),
    )
    lists.block.add(Entry("10.0.0.0/8", "wide ban"))
    lists.block.add(Entry("::/0", "all v6"))
    assert lists.decide("192.0.2.10", NOW) == ("allow", lists.allow.get("192.0.2.10"))
    decision, entry = lists.decide("192.0.2.11", NOW)
    assert decision == "block" and entry.reason == "abuse"
    assert lists.decide("198.51.100.1", NOW) == ("neutral", None)
    for loopback in ("127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"):
        decision, entry = lists.decide(loopback, NOW)
        assert decision == "allow" and entry.reason == "loopback", loopback
    decision, entry = lists.decide("10.0.0.1", NOW)
    assert decision == "allow" and entry.reason == "proxy"
    assert lists.trusted_entry("10.0.0.2", NOW) is None
    assert lists.decide("10.0.0.2", NOW)[0] == "block"
    assert lists.decide("2001:db8::1", NOW)[0] == "block"


def test_export_import_round_trip():
    entries = [
        Entry("192.0.2.0/24", "spam run # 42; again", "automatic", NOW, NOW + 3600),
        Entry("2001:db8::/64", "", "feed:drop", NOW, None),
        Entry("198.51.100.7", "brute force\non two lines", "manual", NOW, NOW + 0.25),
    ]
    text = export_text(entries)
    assert text.splitlines() == [
        "192.0.2.0/24 expires=2023-11-14T23:13:20Z source=automatic # spam run # 42; again",
        "2001:db8::/64 source=feed:drop",
        "198.51.100.7/32 expires=2023-11-14T22:13:20.250000Z source=manual"
        " # brute force on two lines",
    ]
    back, errors = import_text(text, "manual", NOW - 10)
    assert errors == []
    assert [(e.network, e.source, e.expires, e.created) for e in back] == [
        (e.network, e.source, e.expires, NOW - 10) for e in entries
    ]
    assert [e.reason for e in back] == ["spam run # 42; again", "", "brute force on two lines"]


def test_import_plain_lists_and_drop_style():
    text = (
        "; Spamhaus DROP List 2024/01/01\n"
        "; Expires: Tue, 02 Jan 2024\n"
        "1.10.16.0/20 ; SBL256894\n"
        "\n"
        "# fail2ban style\n"
        "203.0.113.5\n"
        "   2001:db8::1   # one host\n"
        "198.51.100.1 source=manual\n"
    )
    entries, errors = import_text(text, "feed:drop", NOW)
    assert errors == []
    assert [(e.network, e.reason, e.source) for e in entries] == [
        ("1.10.16.0/20", "SBL256894", "feed:drop"),
        ("203.0.113.5/32", "", "feed:drop"),
        ("2001:db8::1/128", "one host", "feed:drop"),
        ("198.51.100.1/32", "", "manual"),
    ]
    assert all(e.created == NOW and e.expires is None for e in entries)


def test_import_reports_bad_lines_and_keeps_going():
    text = (
        "192.0.2.1\n"
        "not-an-ip # comment\n"
        "192.0.2.0/33\n"
        "192.0.2.2 expires=tomorrow\n"
        "192.0.2.3 expires=2030-01-01T00:00:00\n"
        "192.0.2.4 colour=red\n"
        "192.0.2.5 source=robot\n"
        "192.0.2.6 expires=2000-01-01T00:00:00Z\n"
        "192.0.2.7 expires=2030-01-01T00:00:00+02:00\n"
    )
    entries, errors = import_text(text, "manual", NOW)
    assert [e.network for e in entries] == ["192.0.2.1/32", "192.0.2.7/32"]
    assert entries[1].expires == 1893448800.0
    assert [number for number, _ in errors] == [2, 3, 4, 5, 6, 7, 8]
    messages = dict(errors)
    assert "not-an-ip" in messages[2]
    assert "192.0.2.0/33" in messages[3]
    assert "RFC 3339" in messages[4]
    assert "time zone" in messages[5]
    assert "colour=red" in messages[6]
    assert "source" in messages[7]
    assert "expired" in messages[8]


def test_prefix_of():
    assert prefix_of("192.0.2.7") == "192.0.2.7/32"
    assert prefix_of("::ffff:192.0.2.7") == "192.0.2.7/32"
    assert prefix_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert prefix_of("2001:db8:1:2:3:4:5:6", v6_prefix=48) == "2001:db8:1::/48"
    assert prefix_of(ipaddress.ip_address("2001:db8::1"), v6_prefix=128) == "2001:db8::1/128"
    with pytest.raises(ValueError):
        prefix_of("2001:db8::1", v6_prefix=129)


def _slow_address(text: str) -> tuple[int, int, str]:
    """parse_address as it was: ipaddress for everything (the reference)."""
    address = parse_ip(text)
    return address.version, int(address), str(address)


_spellings = st.one_of(
    st.integers(min_value=0, max_value=2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
    st.integers(min_value=0, max_value=2**128 - 1).map(
        lambda v: str(ipaddress.IPv6Address(v))),
    st.integers(min_value=0, max_value=2**128 - 1).map(
        lambda v: ipaddress.IPv6Address(v).exploded),  # not canonical: the slow path
    st.integers(min_value=0, max_value=2**64).map(lambda v: str(ipaddress.IPv6Address(v))),
    st.integers(min_value=0, max_value=2**32 - 1).map(
        lambda v: f"::ffff:{ipaddress.IPv4Address(v)}"),
    st.sampled_from(["010.1.2.3", "1.2.3.4 ", " ::1", "1.2.3", "::1.2.3.4", "::ffff:1.2.3.4",
                     "2001:DB8::1", "2001:db8::0:1", "fe80::1%eth0", "1.2.3.4\x00", "", "::",
                     "0.0.0.0", "255.255.255.255", "1:2:3:4:5:6:7::", "::1", "a::b:0:0:0"]),
    st.text(alphabet="0123456789abcdef:.", max_size=20))


@settings(max_examples=1500, deadline=None)
@given(text=_spellings)
def test_parse_address_agrees_with_ipaddress(text):
    try:
        expected = _slow_address(text)
    except ValueError:
        with pytest.raises(ValueError):
            parse_address(text)
        return
    assert parse_address(text) == expected
    assert Attempt("x", text).address == expected


@settings(max_examples=1000, deadline=None)
@given(value=st.one_of(st.integers(min_value=0, max_value=2**128 - 1),
                       st.integers(min_value=0, max_value=2**64)),
       plen=st.integers(min_value=0, max_value=128))
def test_prefix_of_ipv6_agrees_with_ipaddress(value, plen):
    expected = str(ipaddress.IPv6Network((value >> (128 - plen) << (128 - plen), plen)))
    address = ipaddress.IPv6Address(value)
    if address.ipv4_mapped is None:
        assert prefix_of(str(address), plen) == expected
        assert prefix_of((6, value), plen) == expected
    v4 = value & 0xFFFFFFFF
    assert prefix_of((4, v4, str(ipaddress.IPv4Address(v4)))) == f"{ipaddress.IPv4Address(v4)}/32"
    assert prefix_of((4, v4)) == f"{ipaddress.IPv4Address(v4)}/32"


def test_lookup_speed_with_100k_entries():
    """Prints the lookup time (never asserted): the target is a few microseconds."""
    rng = random.Random(7)
    cidrs = CidrSet()
    for _ in range(100_000):
        plen = rng.choice([16, 20, 22, 24, 24, 28, 32, 32])
        cidrs.add(Entry(str(ipaddress.IPv4Network((rng.getrandbits(32), plen), strict=False))))
    ips = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(20_000)]
    start = time.perf_counter()
    hits = sum(cidrs.match(ip, NOW) is not None for ip in ips)
    per_lookup = (time.perf_counter() - start) / len(ips)
    print(f"\n{len(cidrs)} entries: {per_lookup * 1e6:.2f} us per lookup, {hits} hits")


# random networks biased towards overlapping ones, so that nesting is common
v4_networks = st.builds(
    lambda value, plen: ipaddress.IPv4Network((value, plen), strict=False),
    st.integers(0, 2**32 - 1).map(lambda v: v & 0xFF00FFFF | 0x0A000000),
    st.integers(0, 32),
)
v6_networks = st.builds(
    lambda value, plen: ipaddress.IPv6Network((value, plen), strict=False),
    st.integers(0, 2**128 - 1).map(lambda v: v & ~(0xFFFF << 96) | (0x2001 << 112)),
    st.integers(0, 128),
)
networks = st.one_of(v4_networks, v6_networks)
addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda v: ipaddress.IPv4Address(v & 0xFF00FFFF | 0x0A000000)),
    st.integers(0, 2**128 - 1).map(
        lambda v: ipaddress.IPv6Address(v & ~(0xFFFF << 96) | (0x2001 << 112))
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    listed=st.lists(st.tuples(networks, st.one_of(st.none(), st.floats(-100, 100))), max_size=40),
    probes=st.lists(addresses, min_size=1, max_size=20),
    offset=st.floats(-100, 100),
)
def test_match_agrees_with_a_brute_force_scan(listed, probes, offset):
    now = NOW + offset
    built = [Entry(str(n), expires=None if e is None else NOW + e) for n, e in listed]
    cidrs = CidrSet(built)
    entries = {e.network: e for e in built}  # a later add replaces an earlier one
    for address in probes:
        covering = [
            e
            for e in entries.values()
            if address in ipaddress.ip_network(e.network) and not e.expired(now)
        ]
        expected = max(
            covering, key=lambda e: ipaddress.ip_network(e.network).prefixlen, default=None
        )
        assert cidrs.match(address, now) == expected
        assert cidrs.match(str(address), now) == expected
        parsed = parse_address(str(address))  # as a login brings it (Attempt.address)
        assert cidrs.match(parsed, now) == expected
        assert cidrs.match(parsed[:2], now) == expected
        # the one that ends last: permanent first, then the latest expiry, most specific
        ends_last = max(covering, default=None, key=lambda e: (
            e.expires is None, e.expires or 0.0, ipaddress.ip_network(e.network).prefixlen))
        assert cidrs.last_to_expire(address, now) == ends_last
        assert cidrs.last_to_expire(parsed, now) == ends_last
