"""Postfix SMTP access policy delegation (SMTPD_POLICY_README): a small TCP server.

Postfix's smtpd (``check_policy_service inet:127.0.0.1:PORT``) sends ``name=value``
lines ending with an empty line and expects ``action=<ACTION>`` plus an empty
line back. It keeps the connection open for its next request (one connection per
smtpd process, closed by Postfix after ``smtpd_policy_service_max_idle``, 300 s).

What we answer, in this order:

* client_address trusted or allowlisted: ``DUNNO``, with no sending limit either
  (the rest of Postfix's restrictions decide; we never answer ``OK``, which
  would bypass them);
* client_address blocklisted (the engine's bans): ``REJECT <reject_message>``;
  Postfix turns it into ``554 5.7.1 ... <reject_message>``;
* a ``sasl_username`` over its sending limit: ``DEFER_IF_PERMIT <RATE_LIMIT_MESSAGE>
  (retry in N s)``, a 450 so the client queues and retries.  The limit counts
  **one unit per request with protocol_state RCPT** (``recipient_count`` is not
  used): a message to N recipients costs N, i.e. the `Limit` is "recipients per
  window", the measure of how much a stolen account can spray, and Postfix
  defers the extra recipients before any data is sent. Configure the check in
  ``smtpd_recipient_restrictions`` *before* any ``permit_sasl_authenticated``
  (a permit would end the list before us); requests in other states are only
  checked against the blocklist and never count;
* anything else, including a client_address that is not an IP (``unknown``):
  ``DUNNO``. The per-user limit still applies without a usable address.

A malformed request is answered ``DEFER_IF_PERMIT Policy request error``: a
temporary failure (as Postfix's own ``smtpd_policy_service_default_action`` for a
broken server is), never a silent pass (``DUNNO`` would let a confused client
skip the ban check) nor a hard 5xx for a bug that is not the sender's. The
connection stays open when the request was framed (ended by the empty line);
an oversized one (more than MAX_REQUEST_BYTES before the empty line) is answered
and then closed, because we cannot tell where its next request would start.

The rate limiter lives in this process's memory: with several exporter replicas
each one counts its own share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from security.attempts import parse_ip
from security.ratelimit import Limit, RateLimiter

if TYPE_CHECKING:
    from security.engine import SecurityManager

log = logging.getLogger(__name__)

MAX_ATTRIBUTES = 64
"""Postfix 3.7 sends about 30 attributes; twice that is room for future ones."""
MAX_REQUEST_BYTES = 8192
"""All lines of one request, newlines included, up to the empty line."""
REQUEST_TYPE = "smtpd_access_policy"
RATE_CLASS = "postfix_sasl_rcpt"
"""RateLimiter class of the per-sasl_username counter (one unit per RCPT)."""
RATE_LIMIT_MESSAGE = "Sending rate limit exceeded"
ERROR_ACTION = "DEFER_IF_PERMIT Policy request error"
DUNNO = "DUNNO"
# Postfix's SMTP states (access(5)): a span attribute, so a client's own word stays out
PROTOCOL_STATES = frozenset({"CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA",
                             "END-OF-MESSAGE", "VRFY", "ETRN"})


class PolicyRequestError(ValueError):
    """A request Postfix would not send; `reason` is a short, bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_request(lines: list[bytes]) -> dict[str, str]:
    """The attributes of one request, given its lines without the terminating empty line.

    A trailing ``\\n`` (or ``\\r\\n``, for people typing into telnet) is dropped from
    each line; the value is everything after the first ``=``, so it may contain
    ``=``. Unknown names are kept (Postfix adds attributes over time); a repeated
    name keeps its last value. Raises PolicyRequestError.
    """
    if len(lines) > MAX_ATTRIBUTES:
        raise PolicyRequestError("too_many_attributes",
                                 f"more than {MAX_ATTRIBUTES} attributes")
    if sum(len(line) for line in lines) > MAX_REQUEST_BYTES:
        raise PolicyRequestError("too_large", f"request longer than {MAX_REQUEST_BYTES} bytes")
    attributes: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyRequestError("not_utf8", f"line {number} is not UTF-8") from None
        line = line.removesuffix("\n").removesuffix("\r")
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise PolicyRequestError("malformed", f"line {number} is not name=value")
        attributes[name] = value
    request = attributes.get("request")
    if request is None:
        raise PolicyRequestError("missing_request", "no request attribute")
    if request != REQUEST_TYPE:
        raise PolicyRequestError("unsupported_request", f"request={request[:64]!r} unsupported")
    return attributes


def format_action(action: str) -> bytes:
    """``action=<action>`` and the empty line, as bytes for the socket.

    SMTP reply text is US-ASCII on one line: anything else (a newline would end
    the reply early and desynchronise the connection) becomes ``?``.
    """
    text = "".join(c if " " <= c <= "~" else "?" for c in action)
    return f"action={text}\n\n".encode("ascii")


def decide(request: dict[str, str], engine: SecurityManager, limiter: RateLimiter,
           limits: Limit | None, now: float) -> str:
    """The action for one parsed request (see the module docstring for the rules).

    Only `limiter` changes: a RCPT from a ``sasl_username`` costs one unit of
    `limits` (None: no sending limit).
    """
    try:
        ip = parse_ip(request.get("client_address", ""))
    except ValueError:
        ip = None  # "unknown" or missing: no address verdict, the user limit still applies
    if ip is not None:
        verdict, _ = engine.lists.decide(ip, now)  # trusted and allowlisted are "allow"
        if verdict == "allow":
            return DUNNO
        if verdict == "block":
            return f"REJECT {engine.settings.reject_message}"
    user = request.get("sasl_username", "").strip().lower()
    if user and limits is not None and request.get("protocol_state", "").upper() == "RCPT":
        result = limiter.hit(RATE_CLASS, user, limits, now)
        if not result.allowed:
            wait = max(1, math.ceil(result.retry_after))
            return f"DEFER_IF_PERMIT {RATE_LIMIT_MESSAGE} (retry in {wait} s)"
    return DUNNO


@dataclass
class PostfixStats:
    """Counters the exporter turns into metrics; keys are bounded labels, never IPs or users.

    `requests`: answered well-formed requests by action (dunno, reject, defer).
    `errors`: by reason: a PolicyRequestError reason (answered ``ERROR_ACTION``),
    ``incomplete`` (EOF inside a request, no answer), ``internal`` (decide()
    raised: answered per the engine's fail_open).
    """

    requests: dict[str, float] = field(
        default_factory=lambda: {"dunno": 0.0, "reject": 0.0, "defer": 0.0})
    errors: dict[str, float] = field(default_factory=dict)
    connections: float = 0.0
    """Connections accepted, in total."""
    refused: float = 0.0
    """Connections closed at once: max_connections were open, or stop() had begun."""
    idle_timeouts: float = 0.0
    """Connections closed because a request and its answer took longer than idle_timeout."""
    active: int = 0

    def count_action(self, action: str) -> str:
        """Counts the answer under its bounded class (dunno, reject, defer), returned."""
        word = action.split(" ", 1)[0].upper()
        key = {"REJECT": "reject", "DEFER_IF_PERMIT": "defer"}.get(word, "dunno")
        self.requests[key] = self.requests.get(key, 0.0) + 1
        return key

    def count_error(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0.0) + 1


class PostfixPolicyServer:
    """The policy service on a TCP port: one asyncio task per Postfix connection.

    `idle_timeout` bounds the wait for each complete request, so a client that
    connects and stays silent (or trickles bytes) frees its slot. Keep it above
    Postfix's ``smtpd_policy_service_max_idle`` (300 s), or set that below it:
    when we close a connection Postfix still holds, its next request fails once
    and Postfix retries after ``smtpd_policy_service_retry_delay`` (1 s).
    """

    def __init__(self, engine: SecurityManager, limits: Limit | None, *,
                 idle_timeout: float = 30.0, max_connections: int = 256) -> None:
        self.engine = engine
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.limiter = RateLimiter()
        self.stats = PostfixStats()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 picks a free port); returns the bound address."""
        self._closing = False
        # limit: the read buffer; a line longer than a whole request is refused by readuntil
        self._server = await asyncio.start_server(self._accept, host, port,
                                                  limit=MAX_REQUEST_BYTES + 2)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def stop(self) -> None:
        """Stop listening, close every client connection and wait for the handlers."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self.stats.active >= self.max_connections:
            self.stats.refused += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-answer: nothing left to tell it
        except Exception:
            log.exception("postfix policy connection failed")
        finally:
            self.stats.active -= 1
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Request, answer, repeat, until EOF, idle timeout or an unrecoverable request.

        The timeout covers the whole exchange, the answer's drain included, so a
        client that sends but never reads cannot hold its slot either.
        """
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    if not await self._exchange(reader, writer):
                        return
            except TimeoutError:
                self.stats.idle_timeouts += 1
                return

    async def _exchange(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; False when the connection should close."""
        try:
            lines, complete = await _read_request(reader)
        except _Oversized:
            self.stats.count_error("too_large")
            writer.write(format_action(ERROR_ACTION))
            await writer.drain()
            return False
        if not complete:
            if lines:  # EOF inside a request: nobody is left to read an answer
                self.stats.count_error("incomplete")
            return False
        writer.write(format_action(self._answer(lines)))
        await writer.drain()
        return True

    def _answer(self, lines: list[bytes]) -> str:
        try:
            request = parse_request(lines)
        except PolicyRequestError as exc:
            self.stats.count_error(exc.reason)
            log.info("bad postfix policy request", extra={"reason": exc.reason,
                                                         "error": str(exc)})
            return ERROR_ACTION
        # a security decision like the engine's check: its span (a root: the request comes
        # over Postfix's own protocol, with no trace context) and its latency sample
        with self.engine.observe("postfix_policy") as observation:
            try:
                action = decide(request, self.engine, self.limiter, self.limits,
                                self.engine.clock())
            except Exception:
                log.exception("postfix policy decision failed")
                self.stats.count_error("internal")
                observation.fail("internal")
                action = DUNNO if self.engine.settings.fail_open else ERROR_ACTION
            observation.set("action", self.stats.count_action(action))
            observation.set("protocol_state", _state(request))
        return action


def _state(request: dict[str, str]) -> str:
    state = request.get("protocol_state", "").upper()
    return state if state in PROTOCOL_STATES else "other"


class _Oversized(Exception):
    """More than MAX_REQUEST_BYTES before the empty line."""


async def _read_request(reader: asyncio.StreamReader) -> tuple[list[bytes], bool]:
    """(lines, complete): the lines up to the empty line, or what came before EOF."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                lines.append(exc.partial)
            return lines, False
        except asyncio.LimitOverrunError:
            raise _Oversized from None
        if line in (b"\n", b"\r\n"):
            return lines, True  # an empty request is answered as a bad one
        size += len(line)
        if size > MAX_REQUEST_BYTES:
            raise _Oversized
        lines.append(line)
