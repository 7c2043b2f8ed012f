"""Postfix policy delegation: parsing, formatting, decisions, and the server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from security.engine import SecurityManager
from security.protocols.postfix import (
    ERROR_ACTION,
    MAX_ATTRIBUTES,
    MAX_REQUEST_BYTES,
    PolicyRequestError,
    PostfixPolicyServer,
    decide,
    format_action,
    parse_request,
)
from security.ratelimit import Limit, RateLimiter
from security.settings import Settings
from security.store.memory import MemoryStore

NOW = 1_700_000_000.0
REJECT_TEXT = "Blocked by a3mailer security policy"
BANNED = "192.0.2.7"  # inside the banned 192.0.2.0/24
CLEAN = "198.51.100.7"


def request_lines(**attrs: str) -> list[bytes]:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
            "protocol_name": "ESMTP", "client_address": CLEAN, "client_name": "mx.example",
            "sender": "a@example.org", "recipient": "b@example.test", "recipient_count": "0",
            "sasl_username": "", "size": "0"}
    base.update(attrs)
    return [f"{k}={v}\n".encode() for k, v in base.items()]


def wire(**attrs: str) -> bytes:
    return b"".join(request_lines(**attrs)) + b"\n"


# --------------------------------------------------------------------------- parsing


def test_parse_keeps_unknown_attributes_and_equals_in_values():
    attrs = parse_request([b"request=smtpd_access_policy\n", b"ccert_subject=CN=a=b\n",
                           b"new_attribute_from_postfix_4=x\n", b"empty=\n", b"crlf=yes\r\n"])
    assert attrs == {"request": "smtpd_access_policy", "ccert_subject": "CN=a=b",
                     "new_attribute_from_postfix_4": "x", "empty": "", "crlf": "yes"}


def test_parse_accepts_lines_without_newline_and_utf8_values():
    attrs = parse_request([b"request=smtpd_access_policy", "sender=j\u00fcrgen@ex.test".encode()])
    assert attrs["sender"] == "j\u00fcrgen@ex.test"


@pytest.mark.parametrize(("lines", "reason"), [
    ([b"request=smtpd_access_policy\n", b"no equals sign\n"], "malformed"),
    ([b"request=smtpd_access_policy\n", b"=value\n"], "malformed"),
    ([b"request=smtpd_access_policy\n", b"\n"], "malformed"),
    ([b"request=smtpd_access_policy\n", b"sender=\xff\xfe\n"], "not_utf8"),
    ([b"client_address=192.0.2.1\n"], "missing_request"),
    ([], "missing_request"),
    ([b"request=something_else\n"], "unsupported_request"),
    ([b"request=smtpd_access_policy\n"] + [b"a%d=1\n" % i for i in range(MAX_ATTRIBUTES)],
     "too_many_attributes"),
    ([b"request=smtpd_access_policy\n", b"x=" + b"y" * MAX_REQUEST_BYTES + b"\n"], "too_large"),
])
def test_parse_errors_carry_a_bounded_reason(lines, reason):
    with pytest.raises(PolicyRequestError) as raised:
        parse_request(lines)
    assert raised.value.reason == reason


def test_parse_limits_are_inclusive():
    lines = [b"request=smtpd_access_policy\n"] + [b"a%d=1\n" % i for i in range(MAX_ATTRIBUTES - 1)]
    assert len(parse_request(lines)) == MAX_ATTRIBUTES
    head = b"request=smtpd_access_policy\n"
    filler = b"x=" + b"y" * (MAX_REQUEST_BYTES - len(head) - 3) + b"\n"
    assert len(head + filler) == MAX_REQUEST_BYTES
    assert parse_request([head, filler])["x"]


@given(st.dictionaries(st.text(st.characters(blacklist_characters="=\n\r",
                                             blacklist_categories=("Cs",)), min_size=1,
                               max_size=20),
                       st.text(st.characters(blacklist_characters="\n\r",
                                             blacklist_categories=("Cs",)), max_size=50),
                       max_size=30))
def test_parse_round_trips_any_attributes(attrs):
    attrs = {**attrs, "request": "smtpd_access_policy"}
    lines = [f"{k}={v}\n".encode() for k, v in attrs.items()]
    assert parse_request(lines) == attrs


def test_format_action():
    assert format_action("DUNNO") == b"action=DUNNO\n\n"
    assert format_action("REJECT go away") == b"action=REJECT go away\n\n"
    # a newline would end the reply early and desynchronise the connection
    assert format_action("REJECT a\nb\r\x00c\u00e9") == b"action=REJECT a?b??c?\n\n"


# --------------------------------------------------------------------------- decide


@pytest.fixture
async def engine() -> AsyncIterator[SecurityManager]:
    manager = SecurityManager(Settings(trusted_networks=("10.0.0.0/8",), allowlist=("192.0.2.99",),
                                       reject_message=REJECT_TEXT), MemoryStore())
    await manager.start(maintenance_interval=3600)
    await manager.ban("192.0.2.0/24", "test", 3600)
    yield manager
    await manager.stop()


def attrs(**kw: str) -> dict[str, str]:
    return parse_request(request_lines(**kw))


async def test_decide_bans_trust_and_allowlist(engine):
    limiter, now = RateLimiter(), engine.clock()
    assert decide(attrs(client_address=BANNED), engine, limiter, None, now) == (
        f"REJECT {REJECT_TEXT}")
    assert decide(attrs(client_address=f"::ffff:{BANNED}"), engine, limiter, None, now) == (
        f"REJECT {REJECT_TEXT}")
    # the allowlist wins over the ban around it; trusted networks are never limited
    assert decide(attrs(client_address="192.0.2.99"), engine, limiter, None, now) == "DUNNO"
    tight = Limit(1, 3600)
    for _ in range(3):
        assert decide(attrs(client_address="10.1.2.3", sasl_username="alice"), engine, limiter,
                      tight, now) == "DUNNO"
    assert decide(attrs(), engine, limiter, None, now) == "DUNNO"
    # bans apply in every protocol state
    assert decide(attrs(client_address=BANNED, protocol_state="END-OF-MESSAGE"), engine,
                  limiter, None, now).startswith("REJECT ")


@pytest.mark.parametrize("address", ["unknown", "", "300.1.2.3", "not an ip"])
async def test_decide_unusable_client_address_is_dunno(engine, address):
    assert decide(attrs(client_address=address), engine, RateLimiter(), Limit(1, 60),
                  NOW) == "DUNNO"
    assert decide({"request": "smtpd_access_policy"}, engine, RateLimiter(), None,
                  NOW) == "DUNNO"


async def test_decide_rate_counts_rcpt_per_sasl_user_only():
    engine = SecurityManager(Settings(trusted_networks=()), MemoryStore())
    limiter, limit = RateLimiter(), Limit(rate=60, window=3600, burst=2)  # 3 at once, 1/min

    def ask(now: float, **kw: str) -> str:
        return decide(attrs(**kw), engine, limiter, limit, now)

    for _ in range(3):
        assert ask(NOW, sasl_username="Alice") == "DUNNO"
    # other states and unauthenticated requests never count
    for state in ("DATA", "END-OF-MESSAGE", "MAIL", "CONNECT"):
        assert ask(NOW, sasl_username="alice", protocol_state=state) == "DUNNO"
    assert ask(NOW) == "DUNNO"
    # the 4th recipient within the burst is deferred, the user name case-folded
    assert ask(NOW, sasl_username=" alice ") == "DEFER_IF_PERMIT Sending rate limit exceeded" \
        " (retry in 60 s)"
    assert ask(NOW + 30.5, sasl_username="alice").endswith("(retry in 30 s)")
    assert ask(NOW, sasl_username="bob") == "DUNNO"  # per user
    assert ask(NOW + 60, sasl_username="alice") == "DUNNO"  # refilled one
    assert ask(NOW + 60, sasl_username="alice").startswith("DEFER_IF_PERMIT ")
    # without a limit, nobody is deferred
    assert decide(attrs(sasl_username="alice"), engine, limiter, None, NOW) == "DUNNO"


async def test_decide_rate_applies_without_a_usable_address():
    engine = SecurityManager(Settings(trusted_networks=()), MemoryStore())
    limiter, limit = RateLimiter(), Limit(1, 3600)
    assert decide(attrs(client_address="unknown", sasl_username="u"), engine, limiter, limit,
                  NOW) == "DUNNO"
    assert decide(attrs(client_address="unknown", sasl_username="u"), engine, limiter, limit,
                  NOW).startswith("DEFER_IF_PERMIT ")


# --------------------------------------------------------------------------- server

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def answer(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the server closed the connection (EOF, or a reset) within 5 s."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
async def serve(engine) -> AsyncIterator[Callable[..., Awaitable[tuple[PostfixPolicyServer,
                                                                     Connect]]]]:
    servers: list[PostfixPolicyServer] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(limits: Limit | None = None, **kw: float) -> tuple[PostfixPolicyServer,
                                                                       Connect]:
        server = PostfixPolicyServer(engine, limits, **kw)  # type: ignore[arg-type]
        host, port = await server.start("127.0.0.1", 0)
        assert host == "127.0.0.1" and port > 0
        servers.append(server)

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection(host, port)
            writers.append(writer)
            return reader, writer

        return server, connect

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        await server.stop()


async def test_server_answers_several_requests_on_one_connection(serve):
    server, connect = await serve(Limit(rate=1, window=3600, burst=1))
    reader, writer = await connect()
    writer.write(wire(client_address=CLEAN))
    assert await answer(reader) == b"action=DUNNO\n\n"
    writer.write(wire(client_address=BANNED))
    assert await answer(reader) == f"action=REJECT {REJECT_TEXT}\n\n".encode()
    # two requests in one write, and one split across writes
    writer.write(wire(sasl_username="alice") + wire(sasl_username="alice"))
    assert await answer(reader) == b"action=DUNNO\n\n"
    assert await answer(reader) == b"action=DUNNO\n\n"
    data = wire(sasl_username="alice")
    writer.write(data[:7])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(data[7:])
    assert await answer(reader) == (b"action=DEFER_IF_PERMIT Sending rate limit exceeded"
                                    b" (retry in 3600 s)\n\n")
    assert server.stats.requests == {"dunno": 3.0, "reject": 1.0, "defer": 1.0}
    assert server.stats.connections == 1 and server.stats.active == 1
    assert server.stats.errors == {}


async def test_malformed_request_is_deferred_and_the_connection_kept(serve):
    server, connect = await serve()
    reader, writer = await connect()
    other_reader, other_writer = await connect()
    writer.write(b"request=smtpd_access_policy\nthis line has no equals sign\n\n")
    assert await answer(reader) == f"action={ERROR_ACTION}\n\n".encode()
    writer.write(b"\n")  # an empty request
    assert await answer(reader) == f"action={ERROR_ACTION}\n\n".encode()
    writer.write(wire(client_address=BANNED))  # the same connection still works
    assert (await answer(reader)).startswith(b"action=REJECT ")
    other_writer.write(wire())
    assert await answer(other_reader) == b"action=DUNNO\n\n"
    assert server.stats.errors == {"malformed": 1.0, "missing_request": 1.0}
    assert server.stats.requests == {"dunno": 1.0, "reject": 1.0, "defer": 0.0}


async def test_oversized_request_is_answered_then_closed(serve):
    server, connect = await serve()
    for payload in (b"x=" + b"y" * (2 * MAX_REQUEST_BYTES),  # one endless line
                    b"request=smtpd_access_policy\n" + b"x=yyyyyyyy\n" * 1000):  # many lines
        reader, writer = await connect()
        writer.write(payload)
        assert await answer(reader) == f"action={ERROR_ACTION}\n\n".encode()
        assert await closed(reader)
    assert server.stats.errors == {"too_large": 2.0}


async def test_no_terminator_then_eof_gets_no_answer(serve):
    server, connect = await serve()
    reader, writer = await connect()
    writer.write(b"".join(request_lines()))  # no empty line
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # nothing, then a clean close
    reader, writer = await connect()
    writer.write_eof()  # EOF between requests is a normal goodbye
    assert await asyncio.wait_for(reader.read(), 5) == b""
    for _ in range(100):
        if server.stats.active == 0:
            break
        await asyncio.sleep(0.01)
    assert server.stats.errors == {"incomplete": 1.0}
    assert server.stats.active == 0 and server.stats.requests["dunno"] == 0


async def test_silent_client_is_closed_after_idle_timeout_others_served(serve):
    server, connect = await serve(idle_timeout=0.3)
    silent_reader, _ = await connect()
    busy_reader, busy_writer = await connect()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):  # keeps answering while the silent one waits
        busy_writer.write(wire())
        assert await answer(busy_reader) == b"action=DUNNO\n\n"
        await asyncio.sleep(0.1)
    assert await closed(silent_reader)
    assert 0.25 < loop.time() - started < 3
    assert server.stats.idle_timeouts >= 1
    assert server.stats.requests["dunno"] == 5


async def test_connections_over_the_limit_are_refused(serve):
    server, connect = await serve(max_connections=2)
    first, second = await connect(), await connect()
    for reader, writer in (first, second):  # both are being served
        writer.write(wire())
        assert await answer(reader) == b"action=DUNNO\n\n"
    third_reader, third_writer = await connect()
    assert await closed(third_reader)
    assert server.stats.refused == 1
    first[1].close()  # a slot frees up
    for _ in range(100):
        if server.stats.active < 2:
            break
        await asyncio.sleep(0.01)
    reader, writer = await connect()
    writer.write(wire())
    assert await answer(reader) == b"action=DUNNO\n\n"
    assert server.stats.connections == 3


async def test_stop_closes_clients_and_frees_the_port(engine):
    server = PostfixPolicyServer(engine, None)
    host, port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(wire())
    assert await answer(reader) == b"action=DUNNO\n\n"
    await asyncio.wait_for(server.stop(), 5)
    assert await closed(reader)
    assert server.stats.active == 0
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)
    writer.close()
    # it can start again
    host, port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(wire())
    assert await answer(reader) == b"action=DUNNO\n\n"
    writer.close()
    await server.stop()


async def test_a_failing_decision_follows_fail_open(engine, monkeypatch):
    server = PostfixPolicyServer(engine, None)
    host, port = await server.start("127.0.0.1", 0)

    def broken(*args: object) -> str:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.lists, "decide", broken)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(wire())
    assert await answer(reader) == b"action=DUNNO\n\n"  # fail_open defaults to true
    engine.configure(Settings(trusted_networks=(), fail_open=False))
    monkeypatch.setattr(engine.lists, "decide", broken)
    writer.write(wire())
    assert await answer(reader) == f"action={ERROR_ACTION}\n\n".encode()
    assert server.stats.errors == {"internal": 2.0}
    writer.close()
    await server.stop()
