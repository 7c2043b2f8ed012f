"""Probes and the delivery round trip against a real Postfix and Dovecot on loopback,
plus the faults a probe must survive: refused, silent, garbage, bad TLS, expired cert.

One mail stack serves the module (its start costs seconds): Dovecot with TLS (STARTTLS,
IMAPS, POP3S) and no failure delays, Postfix with STARTTLS on 25 and AUTH on submission,
delivering over LMTP through `LmtpGate`, a relay the tests can close to hold deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.probes import Target, build_probes, http, imap, pop3, smtp
from exporter.probes.delivery import HEADER, DeliveryRoundtrip, DeliverySettings
from tests.integration.components import (
    DEFAULT_MAIL_USERS,
    LOOPBACK,
    MAIL_DOMAIN,
    BoundIMAP4,
    Dovecot,
    MailStack,
    Postfix,
    RecordedRequest,
    RecordingHTTPServer,
    cert_not_after,
    next_loopback_ip,
    require_binary,
    wait_until,
)

pytestmark = pytest.mark.integration

ALICE = f"alice@{MAIL_DOMAIN}"
# Dovecot's per-IP penalty and failure delay would only slow the bad-password cases down.
NO_PENALTY = "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"


class LmtpGate:
    """A TCP relay from Postfix's LMTP client to Dovecot's LMTP listener. While closed it
    holds every byte Postfix sends, so a delivery waits (Postfix keeps the message and
    waits up to its 300 s LMTP timeouts) until the gate opens again."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.open = threading.Event()
        self.open.set()
        self._stopping = threading.Event()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="lmtp-gate").start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((LOOPBACK, self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, gated: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                while gated and not self.open.wait(0.1):
                    if self._stopping.is_set():
                        return
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        self._stopping.set()
        self.open.set()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MailStack, LmtpGate]]:
    workdir = tmp_path_factory.mktemp("probes-mail")
    dovecot = Dovecot(workdir / "dovecot", dict(DEFAULT_MAIL_USERS), tls=True,
                      auth_failure_delay="0", extra_config=NO_PENALTY).start()
    gate = LmtpGate(dovecot.lmtp_port)
    try:
        postfix = Postfix(workdir / "postfix", lmtp_port=gate.port, domains=[MAIL_DOMAIN],
                          mailboxes=list(DEFAULT_MAIL_USERS), sasl_auth_port=dovecot.auth_port,
                          tls_cert=dovecot.cert_path, tls_key=dovecot.key_path).start()
    except BaseException:
        gate.stop()
        dovecot.stop()
        raise
    mail = MailStack(dovecot=dovecot, postfix=postfix, users=dict(DEFAULT_MAIL_USERS))
    try:
        yield mail, gate
    finally:
        mail.stop()
        gate.stop()


@pytest.fixture
def mail(stack: tuple[MailStack, LmtpGate]) -> MailStack:
    return stack[0]


@pytest.fixture
def gate(stack: tuple[MailStack, LmtpGate]) -> Iterator[LmtpGate]:
    yield stack[1]
    stack[1].open.set()


@pytest.fixture
def alice_file(tmp_path: Path) -> str:
    path = tmp_path / "alice.credentials"
    path.write_text(f"{ALICE}:{DEFAULT_MAIL_USERS[ALICE]}\n")
    return str(path)


@pytest.fixture
def wrong_file(tmp_path: Path) -> str:
    path = tmp_path / "wrong.credentials"
    path.write_text(f"{ALICE}:not-the-password\n")
    return str(path)


def probe_target(protocol: str, port: int, **kw) -> Target:
    return Target(name=kw.pop("name", f"{protocol}-test"), protocol=protocol, host=LOOPBACK,
                  port=port, timeout=kw.pop("timeout", 10.0), **kw)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler, **kw: Any) -> AsyncIterator[int]:
    """A loopback asyncio server running `handler` per connection; yields its port. On
    exit it waits until every connection has ended and is closed on the server side."""
    handlers: list[asyncio.Task[None]] = []

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(ConnectionError):
                await handler(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    server = await asyncio.start_server(run, LOOPBACK, 0, **kw)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), 5)
        await server.wait_closed()


# --------------------------------------------------------------------------- SMTP


async def test_smtp_port_25_plain(mail):
    result = await smtp.probe(probe_target("smtp", mail.postfix.smtp_port))
    assert result.success, result.reason
    assert result.details["banner"] == "220 mx.example.test ESMTP"
    assert {"PIPELINING", "SIZE", "STARTTLS"} <= set(result.details["capabilities"])
    assert result.details["pipelining"] is True and result.details["size_limit_bytes"] > 0
    assert result.tls is None
    assert {"connect", "banner", "total"} <= set(result.phases)


async def test_smtp_starttls_verified_with_ca_file_and_exported_expiry(mail):
    cert = mail.dovecot.cert_path
    probes = build_probes({"probes": [{"name": "mx", "protocol": "smtp", "host": LOOPBACK,
                                       "port": mail.postfix.smtp_port, "tls": "starttls",
                                       "ca_file": str(cert)}]})
    outcome = await probes.runs["mx"].once()
    result = outcome.value
    assert result is not None and result.success, result and result.reason
    assert result.tls is not None and result.tls.verified and result.tls.verify_error == ""
    assert result.tls.version in ("TLSv1.2", "TLSv1.3")
    assert result.phases["tls"] > 0
    # STARTTLS then EHLO again: Postfix stops offering STARTTLS inside TLS
    assert "STARTTLS" not in result.details["capabilities"]
    exported = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in probes.collector.collect() for s in family.samples}
    assert exported[("a3mailer_tls_cert_not_after_timestamp_seconds", (("probe", "mx"),))] == \
        cert_not_after(cert)
    assert exported[("a3mailer_probe_tls_verified", (("probe", "mx"),))] == 1.0
    assert exported[("a3mailer_probe_success", (("probe", "mx"), ("protocol", "smtp")))] == 1.0
    health = await probes.checks()["mx"]()
    assert health.status == "healthy"


async def test_self_signed_cert_is_not_verified_but_its_expiry_is_read(mail):
    cert = mail.dovecot.cert_path
    strict = await smtp.probe(probe_target("smtp", mail.postfix.smtp_port, tls="starttls"))
    assert not strict.success
    assert strict.reason == "TLS certificate not verified: self-signed certificate"
    assert strict.tls is not None and not strict.tls.verified
    assert strict.tls.cert_not_after == cert_not_after(cert)
    lenient = await smtp.probe(probe_target("smtp", mail.postfix.smtp_port, tls="starttls",
                                            insecure_skip_verify=True))
    assert lenient.success, lenient.reason
    assert lenient.tls is not None and not lenient.tls.verified
    assert lenient.tls.verify_error == "self-signed certificate"
    assert lenient.tls.cert_not_after == cert_not_after(cert)


async def test_submission_auth_good_and_bad(mail, alice_file, wrong_file):
    port, cert = mail.postfix.submission_port, str(mail.dovecot.cert_path)
    good = await smtp.probe(probe_target("smtp", port, tls="starttls", ca_file=cert,
                                         credentials_file=alice_file))
    assert good.success, good.reason
    assert {"PLAIN", "LOGIN"} <= set(good.details["auth_mechanisms"])
    assert good.phases["auth"] > 0
    bad = await smtp.probe(probe_target("smtp", port, tls="starttls", ca_file=cert,
                                        credentials_file=wrong_file,
                                        source_address=next_loopback_ip()))
    assert not bad.success
    assert bad.reason.startswith("authentication failed: 535 5.7.8")
    assert "not-the-password" not in repr(bad.as_dict())


# --------------------------------------------------------------------------- IMAP, POP3


async def test_imap_starttls_login_select(mail, alice_file):
    result = await imap.probe(probe_target("imap", mail.dovecot.imap_port, tls="starttls",
                                           ca_file=str(mail.dovecot.cert_path),
                                           credentials_file=alice_file))
    assert result.success, result.reason
    assert result.tls is not None and result.tls.verified
    assert isinstance(result.details["messages"], int)
    assert "IMAP4REV1" in result.details["capabilities"]
    assert {"connect", "banner", "tls", "auth", "select", "total"} <= set(result.phases)


async def test_imaps_implicit_and_bad_login(mail, alice_file, wrong_file):
    cert = str(mail.dovecot.cert_path)
    result = await imap.probe(probe_target("imap", mail.dovecot.imaps_port, tls="implicit",
                                           ca_file=cert, credentials_file=alice_file))
    assert result.success, result.reason
    assert result.tls is not None and result.tls.version in ("TLSv1.2", "TLSv1.3")
    bad = await imap.probe(probe_target("imap", mail.dovecot.imaps_port, tls="implicit",
                                        ca_file=cert, credentials_file=wrong_file))
    assert bad.reason.startswith("login failed: NO [AUTHENTICATIONFAILED]")


async def test_pop3_user_pass_and_pop3s(mail, alice_file):
    plain = await pop3.probe(probe_target("pop3", mail.dovecot.pop3_port,
                                          credentials_file=alice_file))
    assert plain.success, plain.reason
    assert {"USER", "STLS"} <= set(plain.details["capabilities"])
    assert plain.details["messages"] >= 0 and plain.phases["auth"] > 0
    secure = await pop3.probe(probe_target("pop3", mail.dovecot.pop3s_port, tls="implicit",
                                           ca_file=str(mail.dovecot.cert_path),
                                           credentials_file=alice_file))
    assert secure.success, secure.reason
    assert secure.tls is not None and secure.tls.verified


# --------------------------------------------------------------------------- HTTP / JMAP


def stalwart_like(request: RecordedRequest) -> tuple[int, str, bytes | str]:
    if request.path == "/.well-known/jmap":
        return 200, "application/json", '{"capabilities": {"urn:ietf:params:jmap:core": {}}}'
    if request.path == "/healthz/live":
        return 200, "text/plain", ""
    if request.path == "/healthz/ready":
        return 503, "text/plain", "no data store"
    return 404, "text/plain", ""


async def test_http_jmap_and_healthz():
    with RecordingHTTPServer(stalwart_like) as server:
        jmap = await http.probe(probe_target("http", server.port, path="/.well-known/jmap"))
        live = await http.probe(probe_target("http", server.port, path="/healthz/live"))
        ready = await http.probe(probe_target("http", server.port, path="/healthz/ready"))
    assert jmap.success, jmap.reason
    assert jmap.details["jmap_capabilities"] == ["urn:ietf:params:jmap:core"]
    assert live.success and live.details["status_code"] == 200
    assert not ready.success
    assert ready.reason == "HTTP status 503 Service Unavailable, expected 200"
    assert ready.details["status_code"] == 503 and "response" in ready.phases


# --------------------------------------------------------------------------- faults


async def test_connection_refused():
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
        result = await smtp.probe(probe_target("smtp", port))
    assert not result.success
    assert result.reason == f"connection refused by {LOOPBACK}:{port}"


async def test_silent_server_times_out_without_leaking():
    ended = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never says a word; returns when the client hangs up
        ended.set()

    before = asyncio.all_tasks()
    async with serve(silent) as port:
        for protocol in ("smtp", "imap", "pop3", "http"):
            ended.clear()
            started = asyncio.get_running_loop().time()
            result = await build_probes({"probes": [{
                "name": "silent", "protocol": protocol, "host": LOOPBACK, "port": port,
                "timeout": "500ms"}]}).runs["silent"].once()
            elapsed = asyncio.get_running_loop().time() - started
            assert result.value is not None and not result.value.success
            phase = "response" if protocol == "http" else "banner"
            assert result.value.reason == f"timed out after 0.5s during {phase}"
            assert 0.45 < elapsed < 1.5
            await asyncio.wait_for(ended.wait(), 2)  # the probe closed its connection
    assert asyncio.all_tasks() - before == set()


@pytest.mark.parametrize("banner", [b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\xff\xfe garbage\r\n"])
async def test_garbage_banner(banner):
    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        await reader.read()

    async with serve(speak) as port:
        smtp_result = await smtp.probe(probe_target("smtp", port))
        imap_result = await imap.probe(probe_target("imap", port))
        pop3_result = await pop3.probe(probe_target("pop3", port))
    assert smtp_result.reason.startswith("not an SMTP reply: ")
    assert imap_result.reason.startswith("not an IMAP greeting: ")
    assert pop3_result.reason.startswith("not a POP3 response: ")
    assert not (smtp_result.success or imap_result.success or pop3_result.success)


async def test_failed_tls_handshake(mail):
    """Implicit TLS against Postfix's plain port 25: its banner is no TLS record."""
    result = await smtp.probe(probe_target("smtp", mail.postfix.smtp_port, tls="implicit"))
    assert not result.success
    assert result.reason.startswith("TLS handshake failed: ")
    assert result.phase == "tls" and result.tls is None


def expired_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed cert (CA:true, SAN 127.0.0.1) valid 2020-01-01 to 2020-01-02."""
    openssl = require_binary("openssl")
    key, csr, cert = directory / "key.pem", directory / "req.csr", directory / "cert.pem"
    (directory / "index.txt").write_text("")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = probe_ca\n[probe_ca]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n[any]\n"
        "commonName = supplied\n"
        f"[ext]\nbasicConstraints = critical,CA:true\nsubjectAltName = IP:{LOOPBACK}\n")
    run = {"check": True, "capture_output": True, "cwd": directory}
    subprocess.run([openssl, "req", "-new", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=expired.test",
                    "-keyout", str(key), "-out", str(csr)], **run)
    subprocess.run([openssl, "ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile",
                    str(key), "-in", str(csr), "-startdate", "20200101000000Z", "-enddate",
                    "20200102000000Z", "-extensions", "ext", "-notext", "-rand_serial",
                    "-out", str(cert)], **run)
    return cert, key


async def test_expired_certificate(tmp_path):
    cert, key = expired_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def smtps(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 expired.test ESMTP\r\n")
        while line := await reader.readline():
            writer.write(b"250 expired.test\r\n" if line.upper().startswith(b"EHLO")
                         else b"221 bye\r\n")
            await writer.drain()

    async with serve(smtps, ssl=context) as port:
        strict = await smtp.probe(probe_target("smtp", port, tls="implicit",
                                               ca_file=str(cert)))
        lenient = await smtp.probe(probe_target("smtp", port, tls="implicit",
                                                insecure_skip_verify=True))
    assert not strict.success
    assert strict.reason == "TLS certificate not verified: certificate has expired"
    assert strict.tls is not None and strict.tls.cert_not_after == cert_not_after(cert)
    assert strict.tls.cert_not_after == 1577923200.0  # 2020-01-02T00:00:00Z
    # skipping verification does not hide an expired certificate
    assert not lenient.success
    assert lenient.reason == "TLS certificate expired at 2020-01-02T00:00:00Z"
    assert lenient.details["banner"] == "220 expired.test ESMTP"


# --------------------------------------------------------------------------- delivery


def roundtrip(mail: MailStack, credentials: str, **overrides) -> DeliveryRoundtrip:
    cert = str(mail.dovecot.cert_path)
    config = {
        "enabled": True, "credentials_file": credentials,
        "from_address": ALICE, "to_address": ALICE, "ca_file": cert,
        "submission": {"host": LOOPBACK, "port": mail.postfix.submission_port,
                       "tls": "starttls"},
        "imap": {"host": LOOPBACK, "port": mail.dovecot.imaps_port, "tls": "implicit"},
        "timeout": "10s", "poll_interval": "100ms", **overrides}
    return DeliveryRoundtrip(DeliverySettings.from_config(config))


def tagged_messages(mail: MailStack) -> list[bytes]:
    """Round-trip messages in alice's INBOX, seen by an independent client."""
    client = BoundIMAP4(LOOPBACK, mail.dovecot.imap_port, next_loopback_ip())
    try:
        client.login(ALICE, DEFAULT_MAIL_USERS[ALICE])
        client.select("INBOX")
        _, data = client.search(None, "HEADER", HEADER, '""')
        return data[0].split()
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            client.logout()


async def test_delivery_roundtrip_success_and_message_deleted(mail, alice_file):
    engine = roundtrip(mail, alice_file)
    result = await engine.run()
    assert result.success, result.reason
    seconds = result.details["roundtrip_seconds"]
    assert 0 < seconds < 10 and result.phases["deliver"] == seconds
    assert {"login", "cleanup", "submit", "deliver", "total"} <= set(result.phases)
    assert result.details["queued_as"].startswith("250 2.0.0 Ok: queued as ")
    assert engine.pending == {}
    assert tagged_messages(mail) == []
    histogram = {s.name: s.value for f in engine.roundtrips.collect() for s in f.samples}
    assert histogram["a3mailer_delivery_roundtrip_seconds_count"] == 1.0


async def test_delivery_failure_after_timeout_then_late_cleanup(mail, gate, alice_file):
    probes = build_probes({"delivery": {
        "enabled": True, "credentials_file": alice_file, "from_address": ALICE,
        "to_address": ALICE, "ca_file": str(mail.dovecot.cert_path),
        "submission": {"host": LOOPBACK, "port": mail.postfix.submission_port},
        "imap": {"host": LOOPBACK, "port": mail.dovecot.imaps_port},
        "timeout": "2s", "poll_interval": "100ms"}})
    assert probes.delivery_run is not None and probes.delivery is not None
    gate.open.clear()  # Postfix accepts, LMTP delivery hangs
    outcome = await probes.delivery_run.once()
    failed = outcome.value
    assert failed is not None and not failed.success
    assert failed.reason == "message not delivered within 2s; it is deleted if it arrives later"
    assert len(probes.delivery.pending) == 1
    scraped = {s.name: s.value for f in probes.collector.collect() for s in f.samples}
    assert scraped["a3mailer_delivery_roundtrip_success"] == 0.0
    assert scraped["a3mailer_delivery_roundtrip_pending_messages"] == 1.0
    assert "a3mailer_delivery_roundtrip_last_seconds" not in scraped
    health = await probes.checks()["delivery_roundtrip"]()
    assert (health.status, health.message) == ("unhealthy", failed.reason)

    gate.open.set()  # the held message arrives late
    await asyncio.to_thread(wait_until, lambda: len(tagged_messages(mail)) == 1, 20,
                            "the late message to arrive")
    outcome = await probes.delivery_run.once()
    late = outcome.value
    assert late is not None and late.success, late and late.reason
    assert late.details["deleted_late"] == 1
    assert probes.delivery.pending == {}
    assert tagged_messages(mail) == []
    scraped = {s.name: s.value for f in probes.collector.collect() for s in f.samples}
    assert scraped["a3mailer_delivery_roundtrip_success"] == 1.0
    assert scraped["a3mailer_delivery_roundtrip_last_seconds"] > 0


async def test_delivery_with_bad_credentials_says_where(mail, wrong_file):
    result = await roundtrip(mail, wrong_file).run()
    assert not result.success
    assert result.reason.startswith("delivery-imap (login): login failed: NO")


async def test_a_message_the_server_refused_is_never_awaited(mail, alice_file, wrong_file):
    """A submission that fails (here AUTH) leaves nothing pending: the gauge of late
    messages counted each refused run for cleanup_window before."""
    engine = roundtrip(mail, wrong_file, imap_credentials_file=alice_file)
    for _ in range(2):
        result = await engine.run()
        assert not result.success and result.reason.startswith("delivery-submission (submit)")
    assert engine.pending == {} and result.details["pending_messages"] == 0


async def test_a_traced_probe_run_has_its_phases_as_child_spans(mail, alice_file, otlp_tracing):
    traced, receiver = otlp_tracing
    probes = build_probes({"probes": [{
        "name": "imap-mx", "protocol": "imap", "host": LOOPBACK,
        "port": mail.dovecot.imap_port, "tls": "starttls", "ca_file": str(mail.dovecot.cert_path),
        "credentials_file": alice_file}]})
    outcome = await probes.runs["imap-mx"].once()
    assert outcome.value is not None and outcome.value.success, outcome.value
    assert traced.force_flush()
    root, = receiver.wait_for_spans(lambda s: s.name == "probe-imap-mx")
    spans = receiver.wait_for_spans(lambda s: s.trace_id == root.trace_id, count=6)
    assert root.parent_span_id == ""
    assert root.attributes["server.address"] == LOOPBACK
    assert root.attributes["server.port"] == mail.dovecot.imap_port
    assert root.attributes["a3mailer.probe.protocol"] == "imap"
    assert root.attributes["a3mailer.probe.tls"] == "starttls"
    phases = {s.attributes["a3mailer.probe.phase"]: s for s in spans if s is not root}
    assert set(phases) == {"connect", "banner", "tls", "auth", "select"}
    for phase, span in phases.items():
        assert span.name == f"imap {phase}" and span.parent_span_id == root.span_id
        assert root.start_ns <= span.start_ns <= span.end_ns <= root.end_ns
    password = DEFAULT_MAIL_USERS[f"alice@{MAIL_DOMAIN}"]
    assert not [s for s in spans if password in str(s.attributes) or "alice" in str(
        s.attributes)]
