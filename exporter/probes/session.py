"""One probe connection, timed by phase, and the run that turns any fault into a reason.

The text protocols (SMTP, IMAP, POP3, HTTP/1.1) all read CRLF lines from a TCP
stream that may be upgraded to TLS; `Session` does that once, with bounded line
lengths, and records each phase's seconds in the `ProbeResult`. `run_probe` bounds
the whole run by the target's timeout, retries unverified when a certificate does
not verify (see tlsinfo.py), and maps every failure - refused, reset, timed out,
garbage, a bad handshake - to `success=False` and a reason, never an exception.
When the run is traced (its Periodic's span), each timed phase is a child span
(`<protocol> <phase>`) and the run's span gets the target's server.address,
server.port, protocol, TLS mode and, on failure, the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator

from exporter import tracing
from exporter.probes import tlsinfo
from exporter.probes.target import Credentials, ProbeResult, Target, TLSInfo, read_credentials

log = logging.getLogger(__name__)

LINE_LIMIT = 16 * 1024  # longest line accepted from a server
CLOSE_GRACE = 1.0  # seconds to wait for an orderly close before dropping the connection


class ProbeFailed(Exception):
    """The server answered, but not as a working server should; the message is the reason
    (often with the server's own words), `kind` its class in bounded words."""

    def __init__(self, message: str, kind: str = "server_answer"):
        super().__init__(message)
        self.kind = kind


class CertificateNotVerified(Exception):
    """The verifying handshake failed on the certificate; args[0] is OpenSSL's reason."""


class _EnoughTLS(Exception):
    """Raised after the unverified handshake that only had to read the certificate."""


class Session:
    """A TCP connection to the target, upgradable to TLS, with per-phase timing."""

    def __init__(self, target: Target, result: ProbeResult,
                 context: ssl.SSLContext | None = None, verifying: bool = False,
                 stop_after_tls: bool = False):
        self.target = target
        self.result = result
        self.context = context
        self.verifying = verifying
        self.stop_after_tls = stop_after_tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the block's seconds to `phase` (a phase may be entered twice, e.g. tls)."""
        self.result.phase = phase
        start = time.perf_counter()
        try:
            with tracing.phase(f"{self.target.protocol} {phase}", phase):
                yield
        finally:
            phases = self.result.phases
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start

    def step(self, name: str) -> None:
        """An untimed step (EHLO, CAPABILITY, CAPA): named in a failure's reason and
        details, as the timed phases are, instead of the phase before it."""
        self.result.phase = name

    async def connect(self) -> None:
        """Connects; with implicit TLS, also does the handshake."""
        target = self.target
        local = (target.source_address, 0) if target.source_address else None
        with self.timed("connect"):
            self.reader, self.writer = await asyncio.open_connection(
                target.host, target.port, limit=LINE_LIMIT, local_addr=local)
        if target.tls == "implicit":
            await self.upgrade()

    async def upgrade(self) -> None:
        """The TLS handshake on the open connection (implicit TLS, or after STARTTLS)."""
        assert self.writer is not None and self.reader is not None
        if self.context is None:
            raise ProbeFailed("TLS requested but no TLS context")
        if self.reader._buffer:  # type: ignore[attr-defined]  # data sent before the handshake
            raise ProbeFailed("server sent data before the TLS handshake")
        name = self.target.server_name or self.target.host
        with self.timed("tls"):
            try:
                await self.writer.start_tls(self.context, server_hostname=name,
                                            ssl_handshake_timeout=self.target.timeout)
            except ssl.SSLCertVerificationError as exc:
                raise CertificateNotVerified(tlsinfo.verify_message(exc)) from None
        tls = self.result.tls or TLSInfo()
        tls.version, tls.cert_not_after = tlsinfo.describe(
            self.writer.get_extra_info("ssl_object"))
        tls.verified = self.verifying
        if self.verifying:
            tls.verify_error = ""
        self.result.tls = tls
        if self.stop_after_tls:
            raise _EnoughTLS

    async def readline(self) -> str:
        """One line without its CRLF; a closed connection or an endless line fails the probe."""
        assert self.reader is not None
        try:
            raw = await self.reader.readline()
        except ValueError:  # asyncio's LimitOverrunError, re-raised by readline()
            raise ProbeFailed(f"line longer than {LINE_LIMIT} bytes during "
                              f"{self.result.phase}") from None
        if not raw.endswith(b"\n"):
            raise ProbeFailed(f"connection closed by the server during {self.result.phase}")
        return raw.rstrip(b"\r\n").decode("utf-8", "replace")

    async def read_exactly(self, count: int) -> bytes:
        assert self.reader is not None
        try:
            return await self.reader.readexactly(count)
        except asyncio.IncompleteReadError:
            raise ProbeFailed(
                f"connection closed by the server during {self.result.phase}") from None

    async def read_to_eof(self, limit: int) -> bytes:
        assert self.reader is not None
        return await self.reader.read(limit)

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        """Orderly close (a TLS close_notify too), bounded by CLOSE_GRACE, then abort."""
        writer = self.writer
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), CLOSE_GRACE)
        self.abort()

    def abort(self) -> None:
        """Drops the connection at once (after a failure, or when close() took too long)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.transport.abort()


Dialog = Callable[[Session, Credentials | None], Awaitable[None]]


async def run_probe(target: Target, dialog: Dialog) -> ProbeResult:
    """Runs `dialog` against the target, bounded by its timeout; never raises.

    TLS: the first attempt verifies. When the certificate does not verify, a second
    attempt connects unverified: it stops right after the handshake (having read the
    certificate) unless insecure_skip_verify, in which case it finishes the dialog. A
    certificate past its notAfter fails the probe even with insecure_skip_verify.
    """
    result = ProbeResult()
    start = time.perf_counter()
    tracing.annotate("server.address", target.host)
    tracing.annotate("server.port", target.port)
    tracing.annotate("a3mailer.probe.protocol", target.protocol)
    tracing.annotate("a3mailer.probe.tls", target.tls)
    try:
        async with asyncio.timeout(target.timeout):
            await _run(target, dialog, result)
        result.success = True
    except Exception as exc:
        result.success = False
        result.reason = explain(exc, target, result.phase)
        if not isinstance(exc, ProbeFailed | OSError | TimeoutError | ssl.SSLError):
            log.warning("probe raised", extra={"probe": target.name, "error": result.reason})
        # the class only: the reason may quote the server (an address, a client IP)
        tracing.annotate("a3mailer.probe.reason", failure_class(exc))
    result.phases["total"] = time.perf_counter() - start
    return result


async def _run(target: Target, dialog: Dialog, result: ProbeResult) -> None:
    credentials = None
    if target.credentials_file:
        try:
            credentials = read_credentials(target.credentials_file)
        except ValueError as exc:
            raise ProbeFailed(str(exc)) from None
    if target.tls == "none":
        await _attempt(target, dialog, credentials, Session(target, result))
        return
    first = Session(target, result, tlsinfo.verifying_context(target.ca_file), verifying=True)
    try:
        await _attempt(target, dialog, credentials, first)
    except CertificateNotVerified as exc:
        message = str(exc)
        result.phases.clear()
        result.details.clear()
        result.tls = TLSInfo(verified=False, verify_error=message)
        second = Session(target, result, tlsinfo.unverified_context(), verifying=False,
                         stop_after_tls=not target.insecure_skip_verify)
        with contextlib.suppress(_EnoughTLS):
            await _attempt(target, dialog, credentials, second)
        if not target.insecure_skip_verify:
            raise ProbeFailed(f"TLS certificate not verified: {message}",
                              "tls_unverified") from None
    not_after = result.tls.cert_not_after if result.tls else None
    if not_after is not None and not_after < time.time():
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(not_after))
        raise ProbeFailed(f"TLS certificate expired at {stamp}", "tls_expired")


async def _attempt(target: Target, dialog: Dialog, credentials: Credentials | None,
                   session: Session) -> None:
    try:
        await session.connect()
        await dialog(session, credentials)
        await session.close()
    finally:
        session.abort()
        # the transport closes its socket in a loop callback: let it run, so that when a
        # probe returns, its connection is gone
        await asyncio.sleep(0)


FAILURE_CLASSES = ("server_answer", "tls_unverified", "tls_expired", "timeout",
                   "connection_refused", "connection_reset", "tls_handshake", "network",
                   "error")


def failure_class(exc: BaseException) -> str:
    """A failure in one of FAILURE_CLASSES, for span attributes: never the server's text
    or an address (the reason, for /health and the log, has those)."""
    if isinstance(exc, ProbeFailed):
        return exc.kind
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError):
        return "connection_reset"
    if isinstance(exc, ssl.SSLError):
        return "tls_handshake"
    return "network" if isinstance(exc, OSError) else "error"


def explain(exc: BaseException, target: Target, phase: str) -> str:
    """A failure in words for /health: what went wrong, and in which phase."""
    where = f" during {phase}" if phase else ""
    if isinstance(exc, ProbeFailed):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out after {target.timeout:g}s{where}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {target.host}:{target.port}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by the server{where}"
    if isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
        return f"{text} ({target.host}:{target.port}){where}"
    return f"probe error{where}: {type(exc).__name__}: {exc}"
