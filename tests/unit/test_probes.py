"""Probes without real mail servers: protocol parsing, garbage and truncated input (over
fake servers on loopback), certificate dates, config, the collector and the health checks."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from exporter.probes import (
    PROBERS,
    TARGET_DEFAULTS,
    ProbeResult,
    Target,
    TLSInfo,
    build_probes,
    delivery,
    http,
    imap,
    pop3,
    probe_check,
    read_credentials,
    smtp,
    tlsinfo,
)
from exporter.probes.delivery import DELIVERY_DEFAULTS, DeliverySettings
from exporter.probes.session import LINE_LIMIT, ProbeFailed
from exporter.schedule import Outcome
from tests.integration.components import require_binary

# --------------------------------------------------------------------------- fake servers

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeServer:
    """A loopback TCP server running `script` per connection; remembers how each ended."""

    def __init__(self, script: Script):
        self.script = script
        self.ended: list[str] = []  # "eof" when the client closed, "done" when the script did
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.script(reader, writer)
            self.ended.append("done")
        except (ConnectionError, asyncio.IncompleteReadError):
            self.ended.append("eof")
        finally:
            writer.close()


def lines_script(greeting: bytes, answers: dict[bytes, bytes]) -> Script:
    """Sends `greeting`, then answers each line by its command word (upper case); an IMAP
    tag ("a1") is skipped for the lookup and put where the answer says TAG."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        while line := await reader.readline():
            words = line.split() or [b""]
            tag = words[0] if re.fullmatch(rb"a\d+", words[0]) else b""
            command = (words[1] if tag and len(words) > 1 else words[0]).upper()
            writer.write(answers.get(command, b"").replace(b"TAG", tag))
            await writer.drain()
            if command in (b"QUIT", b"LOGOUT"):
                return
        raise ConnectionError("client went away")

    return script


def target(port: int, protocol: str = "smtp", **kw) -> Target:
    return Target(name="t", protocol=protocol, host="127.0.0.1", port=port,
                  timeout=kw.pop("timeout", 2.0), **kw)


# --------------------------------------------------------------------------- SMTP parsing


def test_smtp_reply_lines():
    assert smtp.parse_reply_line("250-SIZE 10240000") == (250, False, "SIZE 10240000")
    assert smtp.parse_reply_line("250 OK") == (250, True, "OK")
    assert smtp.parse_reply_line("220") == (220, True, "")


@pytest.mark.parametrize("line", ["HELLO there", "2x0 ok", "250xOK", "", "25", "100 go",
                                  "600 nope", "\x16\x03\x01"])
def test_smtp_garbage_is_no_reply(line):
    with pytest.raises(ProbeFailed, match="not an SMTP reply"):
        smtp.parse_reply_line(line)


def test_ehlo_capabilities():
    reply = smtp.Reply(250, ["mx.example.test", "PIPELINING", "SIZE 10240000",
                             "auth plain login", "STARTTLS", "8BITMIME"])
    caps = smtp.parse_ehlo(reply)
    assert caps == {"PIPELINING": "", "SIZE": "10240000", "AUTH": "plain login",
                    "STARTTLS": "", "8BITMIME": ""}


EHLO = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 AUTH PLAIN LOGIN\r\n"


class AuthRecorder:
    """A fake submission server that records the AUTH PLAIN token and answers `verdict`."""

    def __init__(self, verdict: bytes):
        self.verdict = verdict
        self.tokens: list[bytes] = []

    async def script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(EHLO)
            elif line.upper().startswith(b"AUTH PLAIN "):
                self.tokens.append(base64.b64decode(line.split()[2]))
                writer.write(self.verdict)
            elif line.upper().startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            await writer.drain()


async def test_smtp_probe_with_auth(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("probe@example.test:pa:ss\n")
    server = AuthRecorder(b"235 2.7.0 ok\r\n")
    async with FakeServer(server.script) as fake:
        result = await smtp.probe(target(fake.port, credentials_file=str(creds)))
    assert result.success, result.reason
    assert server.tokens == [b"\0probe@example.test\0pa:ss"]
    assert result.details["capabilities"] == ["AUTH", "PIPELINING", "SIZE"]
    assert result.details["size_limit_bytes"] == 1000
    assert result.details["pipelining"] is True
    assert set(result.phases) == {"connect", "banner", "auth", "total"}
    assert fake.ended == ["done"]  # QUIT was sent


async def test_smtp_bad_credentials_reason_quotes_the_server_only(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("probe@example.test:hunter2")
    server = AuthRecorder(b"535 5.7.8 Error: authentication failed\r\n")
    async with FakeServer(server.script) as fake:
        result = await smtp.probe(target(fake.port, credentials_file=str(creds)))
    assert not result.success
    assert result.reason == "authentication failed: 535 5.7.8 Error: authentication failed"
    assert "hunter2" not in repr(result.as_dict())


async def test_smtp_reply_with_changing_code():
    async with FakeServer(lines_script(b"220-a\r\n250 b\r\n", {})) as fake:
        result = await smtp.probe(target(fake.port))
    assert result.reason == "SMTP reply changed code from 220 to 250"


async def test_smtp_truncated_banner():
    async def script(reader, writer):
        writer.write(b"220-mx.test first line\r\n220-sec")
        await writer.drain()

    async with FakeServer(script) as fake:
        result = await smtp.probe(target(fake.port))
    assert not result.success
    assert result.reason == "connection closed by the server during banner"
    assert result.phase == "banner"


async def test_smtp_refusing_banner():
    async with FakeServer(lines_script(b"554 5.3.2 no service today\r\n", {})) as fake:
        result = await smtp.probe(target(fake.port))
    assert result.reason == "server refused the session: 554 5.3.2 no service today"


async def test_endless_line_is_bounded():
    async def script(reader, writer):
        writer.write(b"220 " + b"x" * (LINE_LIMIT * 2))
        await writer.drain()
        await reader.read()

    async with FakeServer(script) as fake:
        result = await smtp.probe(target(fake.port))
    assert result.reason == f"line longer than {LINE_LIMIT} bytes during banner"


async def test_starttls_not_offered():
    answers = {b"EHLO": b"250-mx.test\r\n250 PIPELINING\r\n"}
    async with FakeServer(lines_script(b"220 mx.test\r\n", answers)) as fake:
        result = await smtp.probe(target(fake.port, tls="starttls"))
    assert result.reason == "server does not offer STARTTLS"


async def test_a_failure_after_the_banner_names_its_step_not_the_banner():
    """The server drops the connection at EHLO: the reason said 'during banner', which
    had arrived whole, and sent the operator to look at the greeting."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-mx.example.test ESMTP\r\n220 ready\r\n")
        await writer.drain()
        await reader.readline()  # EHLO
        writer.transport.abort()

    async with FakeServer(drop) as fake:
        result = await smtp.probe(target(fake.port))
    assert not result.success and result.phase == "ehlo", result.reason
    assert result.reason.endswith("during ehlo") and "banner" in result.phases


async def test_data_before_tls_handshake_is_refused():
    """Plaintext sent after '220 go ahead' would be read as if it came over TLS."""
    answers = {b"EHLO": b"250-mx.test\r\n250 STARTTLS\r\n",
               b"STARTTLS": b"220 go ahead\r\n250 injected\r\n"}
    async with FakeServer(lines_script(b"220 mx.test\r\n", answers)) as fake:
        result = await smtp.probe(target(fake.port, tls="starttls"))
    assert result.reason == "server sent data before the TLS handshake"


# --------------------------------------------------------------------------- IMAP parsing


def test_imap_greeting():
    assert imap.parse_greeting("* OK [CAPABILITY IMAP4rev1] ready") == (
        "OK", "[CAPABILITY IMAP4rev1] ready")
    assert imap.parse_greeting("* PREAUTH hi") == ("PREAUTH", "hi")
    assert imap.parse_greeting("* bye shutting down") == ("BYE", "shutting down")
    for garbage in ("+OK dovecot ready", "220 smtp", "* NO", "", "a1 OK"):
        with pytest.raises(ProbeFailed, match="not an IMAP greeting"):
            imap.parse_greeting(garbage)


def test_imap_tagged_responses():
    assert imap.parse_tagged("a1 OK done", "a1") == ("OK", "done")
    assert imap.parse_tagged("a1 no [AUTHENTICATIONFAILED] no", "a1") == (
        "NO", "[AUTHENTICATIONFAILED] no")
    assert imap.parse_tagged("* 3 EXISTS", "a1") is None
    with pytest.raises(ProbeFailed, match="unexpected IMAP response"):
        imap.parse_tagged("a2 OK other tag", "a1")
    with pytest.raises(ProbeFailed, match="bad IMAP completion"):
        imap.parse_tagged("a1 MAYBE", "a1")


def test_imap_capabilities_and_quoting():
    assert imap.parse_capabilities(["CAPABILITY IMAP4rev1 STARTTLS auth=PLAIN", "3 EXISTS"]) == {
        "IMAP4REV1", "STARTTLS", "AUTH=PLAIN"}
    assert imap.quote('pa"ss\\') == '"pa\\"ss\\\\"'
    for bad in ("line\r\nbreak", "pässword"):
        with pytest.raises(ProbeFailed, match="printable ASCII"):
            imap.quote(bad)


async def test_imap_probe_reads_literals_and_counts_messages(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("u:p")
    answers = {
        b"CAPABILITY": b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nTAG OK done\r\n",
        b"LOGIN": b"TAG OK [CAPABILITY IMAP4rev1 UIDPLUS] logged in\r\n",
        b"SELECT": b"* FLAGS (\\Seen)\r\n* 7 EXISTS\r\n* OK {5}\r\nab\r\nc odd literal\r\n"
                   b"TAG OK [READ-WRITE] selected\r\n",
        b"LOGOUT": b"* BYE\r\nTAG OK bye\r\n",
    }
    async with FakeServer(lines_script(b"* OK ready\r\n", answers)) as fake:
        result = await imap.probe(target(fake.port, "imap", credentials_file=str(creds)))
    assert result.success, result.reason
    # the capabilities announced with the LOGIN OK replace the pre-login ones
    assert result.details == {"capabilities": ["IMAP4REV1", "UIDPLUS"], "messages": 7}
    assert {"banner", "auth", "select", "total"} <= set(result.phases)


async def test_an_imap_response_of_endless_literals_is_cut_off(monkeypatch):
    """Each literal within MAX_LITERAL, each ending in another: the response is capped
    (a review's server took a probe to 2 GB in 10 s), and the probe fails with why."""
    monkeypatch.setattr(imap, "MAX_RESPONSE", 300_000)
    sent = [0]

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK ready\r\n")
        await writer.drain()
        await reader.readline()  # a1 CAPABILITY
        writer.write(b"* CAPABILITY {65536}\r\n")
        while sent[0] < 50:  # 3.2 MB unless cut off
            writer.write(b"x" * 65536 + b" {65536}\r\n")
            await writer.drain()
            sent[0] += 1

    async with FakeServer(flood) as fake:
        result = await imap.probe(target(fake.port, "imap", timeout=10.0))
    assert not result.success
    assert result.reason == "IMAP response larger than 300000 bytes"


async def test_imap_bye_greeting_and_failed_login(tmp_path):
    async with FakeServer(lines_script(b"* BYE too many connections\r\n", {})) as fake:
        result = await imap.probe(target(fake.port, "imap"))
    assert result.reason == "server refused the session: BYE too many connections"
    creds = tmp_path / "creds"
    creds.write_text("u:secret")
    answers = {b"CAPABILITY": b"* CAPABILITY IMAP4rev1\r\nTAG OK\r\n",
               b"LOGIN": b"TAG NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"}
    async with FakeServer(lines_script(b"* OK ready\r\n", answers)) as fake:
        result = await imap.probe(target(fake.port, "imap", credentials_file=str(creds)))
    assert result.reason == "login failed: NO [AUTHENTICATIONFAILED] Authentication failed."


# --------------------------------------------------------------------------- POP3 parsing


def test_pop3_status_lines():
    assert pop3.parse_status("+OK Dovecot ready.") == (True, "Dovecot ready.")
    assert pop3.parse_status("+OK") == (True, "")
    assert pop3.parse_status("-ERR [AUTH] Authentication failed.") == (
        False, "[AUTH] Authentication failed.")
    for garbage in ("OK", "* OK imap", "+ok", "220 smtp"):
        if garbage == "+ok":  # case-insensitive on purpose
            assert pop3.parse_status(garbage) == (True, "")
            continue
        with pytest.raises(ProbeFailed, match="not a POP3 response"):
            pop3.parse_status(garbage)
    assert pop3.parse_multiline(["USER", "..dot", ".x"]) == ["USER", ".dot", ".x"]


async def test_pop3_probe_login_and_stat(tmp_path):
    creds = tmp_path / "creds"
    creds.write_text("u:p")
    answers = {b"CAPA": b"+OK\r\nUSER\r\nUIDL\r\n.\r\n", b"USER": b"+OK\r\n",
               b"PASS": b"+OK logged in\r\n", b"STAT": b"+OK 2 340\r\n", b"QUIT": b"+OK\r\n"}
    async with FakeServer(lines_script(b"+OK ready\r\n", answers)) as fake:
        result = await pop3.probe(target(fake.port, "pop3", credentials_file=str(creds)))
    assert result.success, result.reason
    assert result.details == {"capabilities": ["UIDL", "USER"], "messages": 2,
                              "mailbox_bytes": 340}


async def test_pop3_err_banner_and_missing_capa():
    async with FakeServer(lines_script(b"-ERR go away\r\n", {})) as fake:
        result = await pop3.probe(target(fake.port, "pop3"))
    assert result.reason == "server refused the session: -ERR go away"
    answers = {b"CAPA": b"-ERR unknown command\r\n", b"QUIT": b"+OK\r\n"}
    async with FakeServer(lines_script(b"+OK ready\r\n", answers)) as fake:
        result = await pop3.probe(target(fake.port, "pop3"))
    assert result.success and result.details["capabilities"] == []


# --------------------------------------------------------------------------- HTTP parsing


def test_http_status_lines():
    assert http.parse_status_line("HTTP/1.1 503 Service Unavailable") == (
        503, "Service Unavailable")
    assert http.parse_status_line("HTTP/1.0 200") == (200, "")
    for garbage in ("SSH-2.0-OpenSSH", "HTTP/2 200", "HTTP/1.1 2000 x", "220 smtp"):
        with pytest.raises(ProbeFailed, match="not an HTTP response"):
            http.parse_status_line(garbage)


def test_jmap_capabilities():
    body = b'{"capabilities": {"urn:ietf:params:jmap:mail": {}, "urn:ietf:params:jmap:core": {}}}'
    assert http.jmap_capabilities(body, "application/json") == [
        "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"]
    assert http.jmap_capabilities(body, "text/plain") is None
    assert http.jmap_capabilities(b"{not json", "application/json") is None


async def test_http_chunked_body_and_host_header():
    seen: list[bytes] = []

    async def script(reader, writer):
        while (line := await reader.readline()) not in (b"\r\n", b""):
            seen.append(line)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n"
                     b"10\r\n{\"capabilities\":\r\n6\r\n {\"x\":\r\n4\r\n{}}}\r\n0\r\n\r\n")
        await writer.drain()

    async with FakeServer(script) as fake:
        port = fake.port
        result = await http.probe(target(port, "http", path="/.well-known/jmap",
                                         server_name="mail.example.test"))
    assert result.success, result.reason
    assert result.details["jmap_capabilities"] == ["x"]
    assert seen[0] == b"GET /.well-known/jmap HTTP/1.1\r\n"
    assert f"Host: mail.example.test:{port}\r\n".encode() in seen


async def test_a_chunk_larger_than_the_body_cap_is_read_up_to_the_cap():
    """One 2 MiB chunk: read to MAX_BODY and judged by its status, as a Content-Length
    body is (the chunk's rest was taken for the CRLF: 'line longer than 16384 bytes')."""
    big = 2 * 1024 * 1024

    async def script(reader, writer):
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{big:x}\r\n".encode() + b"x" * big + b"\r\n0\r\n\r\n")
        await writer.drain()

    async with FakeServer(script) as fake:
        result = await http.probe(target(fake.port, "http"))
    assert result.success, result.reason
    assert result.details["status_code"] == 200


# --------------------------------------------------------------------------- certificates


def openssl_cert(directory: Path, *extra: str) -> Path:
    openssl = require_binary("openssl")  # fails under CI=true, skips elsewhere
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=t",
                    "-keyout", str(key), "-out", str(cert), *extra],
                   check=True, capture_output=True)
    return cert


def openssl_not_after(cert: Path) -> float:
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert)],
                         check=True, capture_output=True, text=True).stdout
    return float(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]))


@pytest.mark.parametrize("days", ["2", "30000"])  # UTCTime, and GeneralizedTime after 2049
def test_cert_not_after_matches_openssl(tmp_path, days):
    cert = openssl_cert(tmp_path, "-days", days)
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert tlsinfo.cert_not_after(der) == openssl_not_after(cert)


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x02\x01\x00", b"\x30\x84\xff\xff\xff\xff",
                                 b"\x30\x03\x30\x01\x00"])
def test_cert_not_after_rejects_garbage(der):
    with pytest.raises(ValueError):
        tlsinfo.cert_not_after(der)


async def test_tls_handshake_failure_is_a_reason():
    async with FakeServer(lines_script(b"220 plain text, not TLS\r\n", {})) as fake:
        result = await smtp.probe(target(fake.port, tls="implicit"))
    assert not result.success
    assert result.reason.startswith("TLS handshake failed: ")
    assert result.phase == "tls"


# --------------------------------------------------------------------------- config


def test_credentials_file(tmp_path):
    path = tmp_path / "c"
    path.write_text("\nalice@example.test:pa:ss:word\r\n")
    creds = read_credentials(str(path))
    assert (creds.username, creds.password) == ("alice@example.test", "pa:ss:word")
    assert "pa:ss" not in repr(creds) and "pa:ss" not in str(creds)
    path.write_text("no colon here")
    with pytest.raises(ValueError, match="must hold one line user:password"):
        read_credentials(str(path))
    with pytest.raises(ValueError, match="cannot read credentials_file"):
        read_credentials(str(tmp_path / "missing"))


async def test_unreadable_credentials_fail_the_probe_before_connecting(tmp_path):
    result = await smtp.probe(target(1, credentials_file=str(tmp_path / "missing")))
    assert result.reason.startswith("cannot read credentials_file")
    assert "connect" not in result.phases


def test_target_from_config_defaults_and_ports():
    t = Target.from_config({"name": "mx", "protocol": "smtp", "host": "mx.example.test"})
    assert (t.port, t.tls, t.timeout, t.interval) == (25, "none", 10.0, 60.0)
    assert Target.from_config({"name": "s", "protocol": "smtp", "host": "h",
                               "tls": "implicit"}).port == 465
    assert Target.from_config({"name": "i", "protocol": "imap", "host": "h",
                               "tls": "implicit", "timeout": "3s"}).port == 993
    assert Target.from_config({"name": "p", "protocol": "pop3", "host": "h"}).port == 110
    h = Target.from_config({"name": "j", "protocol": "http", "host": "h", "tls": "implicit",
                            "path": "/.well-known/jmap", "expect_status": [200, 401]})
    assert (h.port, h.expect_status) == (443, (200, 401))


async def test_an_ipv6_host_in_brackets_is_reached():
    """[::1] as in a URL: the schema takes it, so the probe must reach it (the resolver
    got the brackets and said 'Name or service not known')."""
    served = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t = Target.from_config({"name": "v6", "protocol": "http", "host": "[::1]",
                                "port": port})
        assert t.host == "::1"
        result = await http.probe(t)
    finally:
        server.close()
    assert result.success, result.reason
    assert f"Host: [::1]:{port}\r\n".encode() in served[0]


@pytest.mark.parametrize("item, message", [
    ({"name": "x", "protocol": "http", "host": "h", "tls": "starttls"}, "no STARTTLS"),
    ({"name": "x", "protocol": "ftp", "host": "h"}, "protocol must be one of"),
    ({"name": "x", "protocol": "smtp", "host": "h", "tls": "maybe"}, "tls must be one of"),
    ({"name": "a b", "protocol": "smtp", "host": "h"}, "probe name"),
    ({"name": "x", "protocol": "smtp"}, "needs 'host'"),
    ({"name": "x", "protocol": "smtp", "host": "h", "colour": 1}, "unknown probe key"),
])
def test_target_from_config_errors(item, message):
    with pytest.raises(ValueError, match=message):
        Target.from_config(item)


def test_build_probes_rejects_duplicate_names_and_incomplete_delivery():
    item = {"name": "mx", "protocol": "smtp", "host": "h"}
    with pytest.raises(ValueError, match=r"probes\[1\]: name 'mx' used twice"):
        build_probes({"probes": [item, item]})
    with pytest.raises(ValueError, match="credentials_file is required"):
        build_probes({"delivery": {"enabled": True}})
    assert build_probes({"enabled": False, "probes": [item]}).runs == {}


def test_every_protocol_has_a_prober():
    from exporter.probes.target import PROTOCOLS

    assert set(PROBERS) == set(PROTOCOLS)


def test_defaults_match_the_config_schema():
    """The loader does not fill defaults into list items, so the probes package keeps
    its own; they must say what the schema says."""
    from exporter.config import load_schema

    monitoring = load_schema()["properties"]["monitoring"]["properties"]
    props = monitoring["probes"]["items"]["properties"]
    assert {k: props[k]["default"] for k in TARGET_DEFAULTS} == TARGET_DEFAULTS
    section = monitoring["delivery"]["properties"]
    for key, value in DELIVERY_DEFAULTS.items():
        if isinstance(value, dict):
            assert {k: section[key]["properties"][k]["default"] for k in value} == value
        else:
            assert section[key]["default"] == value


# --------------------------------------------------------------------------- delivery logic


def test_roundtrip_message_is_dot_stuffed_and_tagged():
    token = delivery.new_token(1_700_000_000.5)
    assert token.startswith("1700000000500.") and delivery.token_time(token) == 1_700_000_000.5
    data = delivery.message_bytes("a@example.test", "b@example.test", token)
    assert data.endswith(b"\r\n.\r\n")
    assert f"\r\nX-A3Mailer-Roundtrip: {token}\r\n".encode() in data
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert delivery.token_time("not-ours") is None


def test_search_and_fetch_parsing():
    assert delivery.parse_search(["SEARCH 3 17", "3 EXISTS", "SEARCH"]) == [3, 17]
    fetched = ["4 FETCH (UID 17 BODY[HEADER.FIELDS (X-A3MAILER-ROUNDTRIP)] {54}\r\n"
               "X-A3Mailer-Roundtrip: 1700000000500.0123456789abcdef\r\n\r\n\r\n)",
               "5 FETCH (FLAGS (\\Seen))"]
    assert delivery.parse_fetch_tokens(fetched) == {17: "1700000000500.0123456789abcdef"}


def test_delivery_settings(tmp_path):
    settings = DeliverySettings.from_config({
        "enabled": True, "credentials_file": "/c", "from_address": "p@example.test",
        "to_address": "p@example.test", "submission": {"host": "mx", "port": 0, "tls": "implicit"},
        "imap": {"host": "imap"}})
    assert (settings.submission.port, settings.imap.port, settings.imap.tls) == (465, 993,
                                                                                  "implicit")
    assert (settings.timeout, settings.interval, settings.cleanup_window) == (120, 300, 86400)
    with pytest.raises(ValueError, match="not an e-mail address"):
        DeliverySettings.from_config({"credentials_file": "/c", "from_address": "x",
                                      "to_address": "p@example.test"})


# --------------------------------------------------------------------------- scrape and health


def outcome(result: ProbeResult | None, error: str = "") -> Outcome[ProbeResult]:
    return Outcome(value=result, error=error, runs=1, started=1.0, duration=0.5)


def samples(collector) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}


def test_collector_reads_last_results_only():
    probes = build_probes({"probes": [
        {"name": "mx", "protocol": "smtp", "host": "h", "tls": "starttls"},
        {"name": "web", "protocol": "http", "host": "h"},
        {"name": "never", "protocol": "imap", "host": "h"}]})
    probes.runs["mx"].last = outcome(ProbeResult(
        success=True, phases={"connect": 0.01, "total": 0.2},
        tls=TLSInfo("TLSv1.3", 1_900_000_000.0, False, "self-signed certificate")))
    probes.runs["web"].last = outcome(None, "timed out after 11s")
    got = samples(probes.collector)
    assert got[("a3mailer_probe_success", (("probe", "mx"), ("protocol", "smtp")))] == 1.0
    assert got[("a3mailer_probe_success", (("probe", "web"), ("protocol", "http")))] == 0.0
    assert got[("a3mailer_probe_duration_seconds",
                (("phase", "connect"), ("probe", "mx"), ("protocol", "smtp")))] == 0.01
    assert got[("a3mailer_probe_duration_seconds",
                (("phase", "total"), ("probe", "web"), ("protocol", "http")))] == 0.5
    assert got[("a3mailer_tls_cert_not_after_timestamp_seconds", (("probe", "mx"),))] == 1.9e9
    assert got[("a3mailer_probe_tls_version_info", (("probe", "mx"), ("version", "TLSv1.3")))]
    assert got[("a3mailer_probe_tls_verified", (("probe", "mx"),))] == 0.0
    assert not any(("probe", "never") in labels for _, labels in got)


async def test_health_check_reads_the_last_result_and_never_probes():
    probes = build_probes({"probes": [{"name": "mx", "protocol": "smtp", "host": "h"}]})
    run = probes.runs["mx"]
    check = probes.checks()["mx"]
    assert (await check()).status == "unknown"
    run.last = outcome(ProbeResult(success=False, reason="connection refused by h:25",
                                   phases={"total": 0.001}))
    result = await check()
    assert (result.status, result.message) == ("unhealthy", "connection refused by h:25")
    assert result.details["reason"] == "connection refused by h:25"
    run.last = outcome(ProbeResult(success=True, phases={"total": 0.25}))
    assert (await check()).status == "healthy"
    run.last = outcome(None, "timed out after 11s")
    assert (await probe_check(run)()).message == "timed out after 11s"


async def test_reload_keeps_unchanged_schedules_and_stops_the_rest():
    config = {"probes": [{"name": "a", "protocol": "smtp", "host": "127.0.0.1", "port": 1,
                          "interval": "1h"},
                         {"name": "b", "protocol": "smtp", "host": "127.0.0.1", "port": 1,
                          "interval": "1h"}]}
    old = build_probes(config)
    old.start()
    await asyncio.sleep(0.05)
    kept, changed = old.runs["a"], old.runs["b"]
    assert kept.last.runs == 1
    config["probes"][1]["port"] = 2
    new = build_probes(config, previous=old)  # started, as the old set was running
    assert new.running and not old.running
    assert new.runs["a"] is kept and new.runs["b"] is not changed
    await asyncio.sleep(0.05)
    assert changed._task is None and kept._task is not None
    assert new.runs["b"].last.runs == 1  # the changed target runs on its new schedule
    await new.stop()
    assert kept._task is None
