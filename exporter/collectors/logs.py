"""Log ingestion: follows Postfix, Dovecot and Stalwart log files and counts what they say.

Three layers, each usable alone:

- **Parsing** (`parse_postfix`, `parse_dovecot`, `parse_stalwart`, `parse_maillog`): pure
  functions from one line to an event tuple, `None` ("ignored": a line from a daemon we
  know that says nothing we count) or `UNPARSED` (a line that should be ours but is not
  shaped like it). They recognise only what is counted, with cheap substring checks
  before any regex, because a busy mail host writes millions of lines a day and the
  exporter must stay far cheaper than fail2ban on the same file.
- **Following** (`LogFollower`): complete lines appended to one file since a saved offset,
  across rotation by rename (the old file is finished first) and by truncation or
  replacement (detected by size and by a fingerprint of the file's first bytes). The
  offset, inode and fingerprint are saved atomically after every batch, so after a
  restart no line is read twice and none is skipped.
- **Counting** (`LogSource`, one per configured file; `LogIngestion`, the collector and
  its polling loop): counters by bounded labels, and authentication events handed to
  the security engine through one callable, `on_auth(login, remote_ip, protocol,
  success)`, so this module never depends on the engine's internals.

Each event is counted from exactly one kind of line, so one login is never counted
twice: Dovecot IMAP/POP3 logins from the login process's `Login:` / `(auth failed, N
attempts ...)` lines (not from the auth process's `Password mismatch` lines, which
repeat them); SMTP AUTH failures from Postfix's smtpd `SASL ... authentication failed`
warnings, and successes from the `auth=N[/M]` count of its `disconnect from` line (a
session that authenticates and sends nothing logs no other trace of it). The login name
of a success, which the security engine needs, is on the `client=..., sasl_username=`
line Postfix writes with each message it accepts; the first of a session is reported.

Parts of a line are client-controlled (a user name, text a client pipelined), so a
parser reads a field only at the place the daemon's own format puts it, never by
searching the whole line: a client must not be able to write a fake success, reject or
failure into a log and have it counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

from prometheus_client.core import Metric

from exporter import catalogue, tracing
from exporter.config import parse_duration
from exporter.schedule import bounded

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- events


class Delivery(NamedTuple):
    """A delivery attempt's outcome for one recipient: sent, deferred, bounced, expired."""

    status: str


class Reject(NamedTuple):
    """An SMTP rejection: reply class (4xx, 5xx) and the stage it happened at."""

    cls: str
    stage: str


class Auth(NamedTuple):
    """Logins seen in a log. `login` and `remote_ip` go to the security engine only,
    never to metric labels. `attempts` > 1 when one line reports several failures."""

    service: str
    success: bool
    login: str
    remote_ip: str
    attempts: int = 1
    # Postfix smtpd process: a success to report to the engine (once per session), whose
    # count comes from the session's SessionEnd; see LogSource.ingest
    session: str = ""


class TlsFailure(NamedTuple):
    """A TLS handshake that failed, by service."""

    service: str


class SessionEnd(NamedTuple):
    """Postfix smtpd finished a session (`disconnect from`), with its successful AUTH
    commands (`auth=N[/M]`: N of M succeeded); ignored when there were none."""

    session: str
    service: str = "smtp"
    auth_successes: int = 0


class Unparsed(NamedTuple):
    """A line that should be ours but is not shaped like it."""


Event = Delivery | Reject | Auth | TlsFailure | SessionEnd | Unparsed
UNPARSED = Unparsed()
Parser = Callable[[str], "Event | None"]

DELIVERY_STATUSES = ("sent", "deferred", "bounced", "expired")
_DELIVERIES = {status: Delivery(status) for status in DELIVERY_STATUSES}
# Reject stages as Postfix names them, lower-cased; anything else is "other".
REJECT_STAGES = frozenset({"connect", "helo", "mail", "rcpt", "data", "end-of-message",
                           "vrfy", "etrn", "header", "body", "other"})
_REJECTS: dict[tuple[str, str], Reject] = {}
_TLS: dict[str, TlsFailure] = {}
MAX_ATTEMPTS_PER_LINE = 100  # a Dovecot "N attempts" beyond this is capped


def _reject(cls: str, stage: str) -> Reject:
    """Interned: a rejection allocates nothing after the first of its kind."""
    key = (cls, stage)
    event = _REJECTS.get(key)
    if event is None:
        event = _REJECTS[key] = Reject(cls, stage)
    return event


def _tls(service: str) -> TlsFailure:
    event = _TLS.get(service)
    if event is None:
        event = _TLS[service] = TlsFailure(service)
    return event


def _valid_ip(text: str) -> bool:
    """An IPv4 or IPv6 address (inet_pton: a tenth of ipaddress's cost on the hot path)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


# --------------------------------------------------------------------------- Postfix
# Lines look alike in syslog and in Postfix's own maillog_file (Postfix 3.7, captured
# from the test harness):
#   Nov 25 11:04:27 mx postfix/submission/smtpd[6333]: warning: unknown[127.0.0.18]: SASL
#       PLAIN authentication failed: (reason unavailable), sasl_username=bob@example.test
# and rsyslog's RFC 3339 timestamps (Debian 12's default) change nothing after the host.

_DELIVERY_AGENTS = frozenset({"smtp", "lmtp", "local", "virtual", "pipe", "error", "retry",
                              "discard", "relay"})
_SMTPD_DAEMONS = frozenset({"smtpd", "postscreen"})
# syslog_name service part -> label; any other (a custom syslog_name) counts as smtp
_POSTFIX_SERVICES = {"submission": "submission", "submissions": "submissions",
                     "smtps": "smtps"}
_STAGES = {"CONNECT": "connect", "HELO": "helo", "EHLO": "helo", "MAIL": "mail",
           "RCPT": "rcpt", "DATA": "data", "END-OF-MESSAGE": "end-of-message",
           "VRFY": "vrfy", "ETRN": "etrn", "header": "header", "body": "body",
           "mime-header": "header", "nested-header": "header"}
# smtpd/postscreen: "RCPT from host[addr]:port: 550 5.1.1 ..." (milter: "5.7.1 ...")
_SMTPD_REJECT = re.compile(
    r"(\S+) from [^\[\s]*\[[^\]]*\](?::\d+)?: (?:([45])\d\d(?: |$)|([45])\.\d{1,3}\.\d{1,3}\b)")
# cleanup header/body checks put the reply last: "...; from=<a> to=<b> ...: 5.7.1 text"
_CLEANUP_TAIL = re.compile(r": (?:([45])\d\d |([45])\.\d{1,3}\.\d{1,3}(?: |$))")
# SASL failures that say nothing about the client's password
_SASL_NOT_CLIENT = ("Connection lost to authentication server",
                    "Invalid authentication mechanism")


def parse_postfix(line: str) -> Event | None:
    """One Postfix log line -> delivery, reject, auth, TLS failure or session end."""
    colon = line.find(": ")
    if colon < 0:
        return UNPARSED if line.strip() else None
    return _postfix_at(line, colon, line.rfind(" ", 0, colon) + 1)


def _postfix_at(line: str, colon: int, start: int) -> Event | None:
    """`colon`: the first ": " (after the program tag); `start`: where the tag starts."""
    bracket = line.find("[", start, colon)
    end = bracket if bracket >= 0 else colon
    slash = line.rfind("/", start, end)
    if slash < 0:
        return None  # another program's line (a shared mail.log): not ours to count
    daemon = line[slash + 1:end]
    if daemon in _DELIVERY_AGENTS:
        return _postfix_delivery(line, colon, daemon)
    if daemon in _SMTPD_DAEMONS:
        return _postfix_smtpd(line, colon, start, end)
    if daemon == "cleanup":
        # header/body checks and milters: "QUEUEID: reject: header ..." / "milter-reject:"
        body = _after_queue_id(line, colon + 2)
        return _queue_reject(line, body) if body >= 0 else None
    if daemon == "qmgr":  # "QUEUEID: from=<sender>, status=expired, returned to sender"
        k = _find_outside_addresses(line, ", status=", colon)
        expired = k >= 0 and line.startswith("expired", k + 9)
        return _DELIVERIES["expired"] if expired else None
    return None


def _find_outside_addresses(line: str, needle: str, start: int) -> int:
    """The first `needle` at or after `start` that is not inside a <...> address (to=,
    orig_to=, from=: the sender chose them, and a quoted local part may hold ", status=",
    "<" or ">"); -1 if none."""
    i = start
    while True:
        k = line.find(needle, i)
        lt = line.find("<", i, k) if k >= 0 else -1
        if lt < 0:
            return k
        i = _address_end(line, lt + 1)
        if i < 0:
            return -1


def _address_end(line: str, i: int) -> int:
    """After the ">" that closes the address starting at `i`, quotes respected; -1 if none."""
    gt = line.find(">", i)
    if gt < 0 or line.find('"', i, gt) < 0:  # the usual address: nothing quoted
        return gt + 1 if gt >= 0 else -1
    quoted = False
    while i < len(line):
        c = line[i]
        if quoted and c == "\\":
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i + 1
        i += 1
    return -1


def _postfix_delivery(line: str, colon: int, daemon: str) -> Event | None:
    k = _find_outside_addresses(line, ", status=", colon)
    if k < 0:
        if daemon in ("smtp", "lmtp") and line.startswith("SSL_connect error to ", colon + 2):
            return _tls("smtp_client")
        return None
    k += 9
    space = line.find(" ", k)
    event = _DELIVERIES.get(line[k:] if space < 0 else line[k:space])
    # other statuses (deliverable, undeliverable: address verification probes) are ignored
    return event


def _postfix_service(line: str, start: int, end: int) -> str:
    """submission for postfix/submission/smtpd, smtp for postfix/smtpd (or anything else)."""
    first = line.find("/", start, end)
    last = line.rfind("/", start, end)
    if first == last:
        return "smtp"
    return _POSTFIX_SERVICES.get(line[first + 1:last], "smtp")


def _postfix_smtpd(line: str, colon: int, start: int, end: int) -> Event | None:
    msg = colon + 2
    if line.startswith("disconnect from ", msg):
        return _postfix_disconnect(line, msg + 16, start, colon, end)
    if line.startswith("connect from ", msg):
        return None
    if line.startswith("warning: ", msg):
        return _postfix_sasl_failure(line, msg + 9, start, end)
    if line.startswith("SSL_accept error from ", msg):
        return _tls(_postfix_service(line, start, end))
    # "QUEUEID: reject: ...", "NOQUEUE: milter-reject: ...", "QUEUEID: client=..., ...":
    # only right after a queue id, never somewhere in text a client sent
    body = _after_queue_id(line, msg)
    if body < 0:
        return None
    if not line.startswith("client=", body):
        return _queue_reject(line, body)
    # "QUEUEID: client=host[addr], sasl_method=PLAIN, sasl_username=bob" (Postfix validates
    # host names, so nothing a client chose comes before the user name)
    k = line.find(", sasl_username=", body)
    if k < 0:
        return None
    ip = _bracketed(line, body)
    if ip is None or not _valid_ip(ip):
        return UNPARSED
    login = _until_comma(line, k + 16)
    return Auth(_postfix_service(line, start, end), True, login, ip, 1, line[start:colon])


def _after_queue_id(line: str, msg: int) -> int:
    """Where the text after "QUEUEID: " (or "NOQUEUE: ") starts at `msg`; -1 if it does not."""
    q = line.find(": ", msg, msg + 32)
    return q + 2 if q > msg and line[msg:q].isalnum() else -1


def _queue_reject(line: str, body: int) -> Event | None:
    """The rejection logged at `body` (after the queue id), if one is."""
    if line.startswith("reject: ", body):
        return _postfix_reject(line, body)
    if line.startswith("milter-reject: ", body):
        return _postfix_reject(line, body + 7)
    return None


def _postfix_disconnect(line: str, at: int, start: int, colon: int, end: int) -> SessionEnd:
    """"disconnect from host[addr] ehlo=2 starttls=1 auth=1 mail=1 ... commands=8"."""
    b = line.find("]", at)
    a = line.find(" auth=", b) if b >= 0 else -1
    successes = 0
    if a >= 0:
        a += 6
        e = a
        while e < len(line) and e - a < 4 and "0" <= line[e] <= "9":
            e += 1
        successes = min(int(line[a:e]), MAX_ATTEMPTS_PER_LINE) if e > a else 0
    return SessionEnd(line[start:colon], _postfix_service(line, start, end) if successes
                      else "smtp", successes)


def _postfix_sasl_failure(line: str, at: int, start: int, end: int) -> Event | None:
    """`at` follows "warning: ": "host[addr]: SASL PLAIN authentication failed: reason[,
    sasl_username=bob]"; other warnings (some quoting what a client sent) are ignored."""
    a = line.find("[", at)
    b = line.find("]", a) if a >= 0 else -1
    if b < 0 or not line.startswith("]: SASL ", b) or line.find(" ", at, a) >= 0:
        return None
    k = line.find(" authentication failed", b + 8)
    if k < 0 or line.find(" ", b + 8, k) >= 0:  # one mechanism name between
        return None
    reason = k + 24  # after " authentication failed: "
    if any(line.startswith(text, reason) for text in _SASL_NOT_CLIENT):
        return None
    ip = line[a + 1:b]
    if not _valid_ip(ip):
        return UNPARSED
    u = line.find(", sasl_username=", k)
    login = _until_comma(line, u + 16) if u >= 0 else ""
    return Auth(_postfix_service(line, start, end), False, login, ip)


def _bracketed(line: str, start: int) -> str | None:
    """The address in the first host[address] after `start` (Postfix validates host names,
    so no client-controlled text can come before it)."""
    a = line.find("[", start)
    if a < 0:
        return None
    b = line.find("]", a)
    return line[a + 1:b] if b > a else None


def _until_comma(line: str, start: int) -> str:
    end = line.find(", ", start)
    return (line[start:] if end < 0 else line[start:end]).rstrip()


def _postfix_reject(line: str, k: int) -> Event:
    """`k` points at "reject: " (also inside "milter-reject: ")."""
    tail = line[k + 8:]
    m = _SMTPD_REJECT.match(tail)
    if m is not None:
        stage = _STAGES.get(m.group(1), "other")
        return _reject((m.group(2) or m.group(3)) + "xx", stage)
    # cleanup header/body checks: "header Subject: x from host[addr]; ...: 5.7.1 text"
    word = tail.split(" ", 1)[0]
    codes = _CLEANUP_TAIL.findall(tail)
    if not codes:
        return UNPARSED
    first, second = codes[-1]
    return _reject((first or second) + "xx", _STAGES.get(word, "other"))


# --------------------------------------------------------------------------- Dovecot
# Dovecot's own log_path (captured from the harness, Dovecot 2.3.19):
#   Nov 25 11:04:21 imap-login: Info: Login: user=<alice@example.test>, method=PLAIN,
#       rip=127.0.0.10, lip=127.0.0.1, mpid=6312, session=<JtP5yRdhd7B/AAAK>
#   Nov 25 11:04:23 imap-login: Info: Disconnected: Aborted login by logging out (auth
#       failed, 1 attempts in 2 secs): user=<alice@example.test>, method=PLAIN, rip=...
# and through syslog: "Nov 25 11:04:21 host dovecot: imap-login: Login: user=<...>, ...".

_DOVECOT_SERVICES = {"imap": "imap", "pop3": "pop3", "submission": "submission",
                     "managesieve": "managesieve", "lmtp": "lmtp"}


def parse_dovecot(line: str) -> Event | None:
    """One Dovecot log line -> auth success/failure or TLS failure from a login process."""
    k = _dovecot_login_tag(line)
    if k < 0:
        return None if line.find(": ") >= 0 or not line.strip() else UNPARSED
    msg = k + 8
    if line.startswith("Info: ", msg):
        msg += 6
    if line.startswith("Login: ", msg):
        return _dovecot_auth(line, k, msg + 7, True, 1)
    a = line.find("(auth failed, ", msg)
    # in the disconnect reason, before the "key=value" fields (a user name among them)
    if a >= 0 and line.find("=", msg, a) < 0:
        a += 14
        b = line.find(" attempt", a)
        count = line[a:b]
        if b < 0 or not (len(count) <= 6 and count.isascii() and count.isdigit()):
            return UNPARSED
        fields = line.find("): ", b)
        return _dovecot_auth(line, k, fields + 3 if fields >= 0 else len(line), False,
                             min(int(count), MAX_ATTEMPTS_PER_LINE))
    if line.find("TLS handshaking", msg) >= 0 or line.find("SSL_accept() failed", msg) >= 0:
        return _tls(_dovecot_service(line, k))
    return None


def _dovecot_login_tag(line: str) -> int:
    """Where "-login: " of a login process's tag is, or -1. Only at the tag's place: the
    line's first ": " (Dovecot's log_path: "<timestamp> imap-login: Info: ..."), or the
    one right after syslog's "dovecot: " / "dovecot[pid]: ". Elsewhere it is text a client
    chose (a Message-ID lmtp logs, a user name the auth process quotes)."""
    colon = line.find(": ")
    if colon < 0:
        return -1
    start = line.rfind(" ", 0, colon) + 1
    tag = line[start:colon]
    if tag == "dovecot" or (tag.startswith("dovecot[") and tag.endswith("]")):
        start = colon + 2
        colon = line.find(": ", start)
        tag = line[start:colon]
    elif "(" in line[:start]:  # inside a process's "lmtp(user)" / "imap(user)" prefix
        return -1
    name = tag[:-6]
    if colon < 0 or not tag.endswith("-login") or not (name.isascii() and name.isalnum()):
        return -1
    return colon - 6


def _dovecot_service(line: str, k: int) -> str:
    start = line.rfind(" ", 0, k) + 1
    return _DOVECOT_SERVICES.get(line[start:k], "other")


def _dovecot_auth(line: str, k: int, fields: int, success: bool, count: int) -> Event:
    """`fields`: where Dovecot's login_log_format_elements list ("user=<...>, method=...,
    rip=..., ..." by default) starts. Dovecot writes the user name inside <> as the client
    sent it (only control characters become "?"), so it can hold ">, rip=...". The list is
    read in its order: the elements before the user's are Dovecot's own, so a rip= among
    them is the real one; when the user comes first, the real rip= is the list's last
    (only Dovecot's own elements follow the user)."""
    user, r = _dovecot_elements(line, fields)
    if r < 0 and user >= 0:
        r = line.rfind(", rip=", user)
        r = r + 2 if r >= 0 else -1
    if r < 0:
        return UNPARSED
    end = line.find(",", r + 4)
    ip = (line[r + 4:] if end < 0 else line[r + 4:end]).strip()
    if not _valid_ip(ip):
        return UNPARSED
    login = "" if user < 0 else _dovecot_user(line, user, r - 2 if r > user else len(line))
    return Auth(_dovecot_service(line, k), success, login, ip, count)


def _dovecot_elements(line: str, pos: int) -> tuple[int, int]:
    """Where the user element and the first rip= element start (-1: not seen), walking
    the list's ", "-separated elements from `pos` up to the user's: only Dovecot's own
    elements lie on the way, so each ", " there is a boundary."""
    rip = -1
    while 0 <= pos < len(line):
        if line.startswith("user=<", pos):
            return pos, rip
        if rip < 0 and line.startswith("rip=", pos):
            rip = pos
        pos = line.find(", ", pos)
        pos = pos + 2 if pos >= 0 else -1
    return -1, rip


def _dovecot_user(line: str, start: int, end: int) -> str:
    """The name in the user element at `start`, which only Dovecot's own elements follow
    up to `end` (the real rip='s ", ", or the line's end). Walking back from `end` over
    element boundaries, the name ends at the first ">" closing the text before one. From
    the line's end, the ">" of the last "session=<...>" element does not count: that one
    is Dovecot's (its only other <> value, written once)."""
    session_passed = end < len(line)
    b = end
    while b > start:
        head = line[start:b]
        if head.endswith(">"):
            if session_passed or not head[head.rfind(", ") + 2:].startswith("session=<"):
                return head[6:-1]
            session_passed = True
        b = line.rfind(", ", start, b)
    return ""


# --------------------------------------------------------------------------- Stalwart
# `<RFC3339> <LEVEL> <description> (<event.name>) key = value, ...` (single-line mode):
#   2026-11-25T10:49:25Z INFO Authentication failed (auth.failed) listenerId = "imap",
#       localPort = 143, remoteIp = 192.0.2.7, remotePort = 51234, accountName = "john"
# Span keys (listenerId, remoteIp, ...) come before the event's own keys.

_STALWART_AUTH = {"auth.success": True, "auth.failed": False}
_STALWART_DELIVERIES = {"delivery.delivered": _DELIVERIES["sent"],
                        "delivery.failed": _DELIVERIES["deferred"],  # a temporary failure
                        "delivery.dsn-perm-fail": _DELIVERIES["bounced"]}
# Rejections whose reply class Stalwart fixes; other refusals are not counted.
_STALWART_REJECTS = {
    "smtp.mailbox-does-not-exist": _reject("5xx", "rcpt"),
    "smtp.relay-not-allowed": _reject("5xx", "rcpt"),
    "smtp.mail-from-unauthenticated": _reject("5xx", "mail"),
    "smtp.mail-from-unauthorized": _reject("5xx", "mail"),
    "smtp.message-too-large": _reject("5xx", "data"),
    "smtp.too-many-recipients": _reject("4xx", "rcpt"),
    "smtp.rate-limit-exceeded": _reject("4xx", "other"),
    "smtp.concurrency-limit-exceeded": _reject("4xx", "connect"),
}
_STALWART_TLS = {"tls.handshake-error": "", "delivery.start-tls-error": "smtp_client",
                 "delivery.implicit-tls-error": "smtp_client"}
# listenerId is the operator's name for a listener; these substrings bound the label
_STALWART_SERVICES = (("submission", "submission"), ("imap", "imap"), ("pop3", "pop3"),
                      ("sieve", "managesieve"), ("lmtp", "lmtp"), ("smtp", "smtp"),
                      ("http", "http"), ("jmap", "http"))


def parse_stalwart(line: str) -> Event | None:
    """One Stalwart/A3Mailer log line -> auth, delivery, reject or TLS failure."""
    close = line.find(") ")
    if close < 0:
        close = len(line) - 1 if line.endswith(")") else -1
    open_ = line.rfind(" (", 0, close) if close > 0 else -1
    if open_ < 0 or not line[:4].isdigit() or line.find(" ", 0, open_) < 0:
        return UNPARSED if line.strip() else None
    name = line[open_ + 2:close]
    success = _STALWART_AUTH.get(name)
    if success is not None:
        return _stalwart_auth(line, close, success)
    event = _STALWART_DELIVERIES.get(name) or _STALWART_REJECTS.get(name)
    if event is not None:
        return event
    service = _STALWART_TLS.get(name)
    if service is not None:
        return _tls(service or _stalwart_service(line, close))
    return None if "." in name else UNPARSED


def _stalwart_value(line: str, key: str, start: int, last: bool = False) -> str | None:
    k = line.rfind(key, start) if last else line.find(key, start)
    if k < 0:
        return None
    k += len(key)
    if line.startswith('"', k):
        end = line.find('", ', k + 1)
        if end < 0:
            end = len(line) - 1 if line.endswith('"') else len(line)
        return line[k + 1:end].replace("\\\\", "\\")
    end = line.find(", ", k)
    return line[k:] if end < 0 else line[k:end]


def _stalwart_service(line: str, start: int) -> str:
    listener = (_stalwart_value(line, "listenerId = ", start) or "").lower()
    for needle, label in _STALWART_SERVICES:
        if needle in listener:
            return label
    return "other"


def _stalwart_auth(line: str, start: int, success: bool) -> Event:
    # Stalwart does not escape '"' inside strings, so a user name can carry a fake
    # "remoteIp = ...". The real one is outside the name: before it (a span key), or else
    # after it, so the last one.
    account = line.find('accountName = "', start)
    remote = line.find("remoteIp = ", start)
    after_account = account >= 0 and (remote < 0 or remote > account)
    ip = _stalwart_value(line, "remoteIp = ", start, last=after_account)
    if ip is None or not _valid_ip(ip.strip()):
        return UNPARSED
    login = _stalwart_value(line, 'accountName = ', start) if account >= 0 else ""
    return Auth(_stalwart_service(line, start), success, login or "", ip.strip())


# --------------------------------------------------------------------------- mixed syslog
def parse_maillog(line: str) -> Event | None:
    """A syslog mail log holding both Postfix and Dovecot (Debian's /var/log/mail.log):
    each line goes to the parser its program tag names; other programs are ignored."""
    colon = line.find(": ")
    if colon < 0:
        return UNPARSED if line.strip() else None
    start = line.rfind(" ", 0, colon) + 1
    if line.startswith("dovecot", start) or line.endswith("-login", start, colon):
        return parse_dovecot(line)  # which reads a login only at its tag's place
    if line.find("/", start, colon) >= 0:
        return _postfix_at(line, colon, start)
    return None


PARSERS: dict[str, Parser] = {"postfix": parse_postfix, "dovecot": parse_dovecot,
                              "stalwart": parse_stalwart, "maillog": parse_maillog}


# --------------------------------------------------------------------------- following

BATCH_BYTES = 1 << 20
FINGERPRINT_BYTES = 512
STATE_VERSION = 1
T = TypeVar("T")


def _open_read(path: str | Path) -> int:
    """A read fd of a regular file. O_NONBLOCK: opening a FIFO without a writer would block
    the worker thread, hence every source and shutdown; regular files ignore the flag. A
    FIFO, device or directory is refused (OSError: the source counts a read error)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or directory "
                      "cannot be followed)", str(path))
    return fd


def _saved(saved: dict[str, Any], key: str, kind: type[T], default: T) -> T:
    """A value of the state file, of exactly the type save() writes (no "false" for False,
    no True for 1); ValueError otherwise."""
    value = saved.get(key, default)
    if type(value) is not kind:
        raise ValueError(f"{key} is not {kind.__name__}: {value!r}")
    return cast(T, value)


class LogFollower:
    """Complete lines appended to one file since a saved offset, rotation-safe.

    - rename (logrotate's default): the path gets a new inode. The old file is read on,
      and only once the new file holds data (so its writer has moved on: logrotate's
      `create` makes it empty before the writer is told to reopen) is the old one read
      to its end, its last line even without a newline, and left for the new one, read
      from its start;
    - truncation (copytruncate) or replacement in place: the size drops below the offset
      or the first bytes no longer match the fingerprint; read again from 0;
    - restart: the saved offset is used when the inode and fingerprint still match; when
      the file was rotated meanwhile, the old file is looked up by inode in the same
      directory (mail.log.1) and finished first, as after a rename seen live.
    A line without its newline yet is left for the next read. A file first seen at start
    with no saved state (or state saved for another path) is read from its end (its
    history is not news); one that appears later, from its start.
    State is saved by `save()` (temp file + os.replace: atomic against a crash of this
    process; not fsynced, so a power loss may roll back one batch). While an old file is
    being finished the state names it, so a crash then resumes it.
    """

    def __init__(self, path: str | Path, state_path: str | Path | None = None,
                 batch_bytes: int = BATCH_BYTES, start_at: str = "end"):
        self.path = Path(path)
        self.state_path = Path(state_path) if state_path is not None else None
        self.batch_bytes = batch_bytes
        self.start_at = start_at
        self.offset = 0
        self.inode = 0
        self.device = 0
        self.fingerprint = ""
        self.fp_len = 0
        self.skipping = False  # inside a line longer than a batch: drop up to its newline
        self.rotations = {"rename": 0, "truncate": 0}
        self.overlong_lines = 0
        self._fd: int | None = None
        self._saved: tuple[int, int, str, int, bool] | None = None
        self._seen_missing = False
        self._restored = self._load()

    # --- state

    def _load(self) -> dict[str, Any] | None:
        if self.state_path is None:
            return None
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("log follower state unreadable; starting afresh",
                        extra={"path": str(self.state_path), "error": str(exc)})
            return None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return None
        if data.get("path") != str(self.path):  # the source now follows another file
            return None
        return data

    def save(self) -> None:
        """Persists offset, inode and fingerprint when they changed since the last save."""
        current = (self.inode, self.offset, self.fingerprint, self.fp_len, self.skipping)
        if self.state_path is None or current == self._saved:
            return
        data = {"version": STATE_VERSION, "path": str(self.path), "inode": self.inode,
                "offset": self.offset, "fingerprint": self.fingerprint,
                "fingerprint_bytes": self.fp_len, "skipping": self.skipping}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.state_path)
        self._saved = current

    # --- opening

    def _fingerprint(self, fd: int, length: int) -> str:
        return hashlib.sha256(os.pread(fd, length, 0)).hexdigest() if length else ""

    def _open(self) -> None:
        """Opens the path (resuming from saved state); FileNotFoundError while it is missing."""
        try:
            fd = _open_read(self.path)
        except FileNotFoundError:
            self._seen_missing = True
            raise
        st = os.fstat(fd)
        self._fd, self.inode, self.device = fd, st.st_ino, st.st_dev
        self.offset, self.fingerprint, self.fp_len, self.skipping = 0, "", 0, False
        restored, self._restored = self._restored, None
        if restored is not None:
            try:
                if self._resume(restored, st.st_size):
                    return
            except (TypeError, ValueError) as exc:  # a hand-edited state file: start afresh
                log.warning("log follower state unusable; reading the file from its start",
                            extra={"path": str(self.state_path), "error": str(exc)})
        elif self.start_at == "end" and not self._seen_missing:
            self._start_at_end(st.st_size)
        self._refresh_fingerprint(st.st_size)

    def _resume(self, saved: dict[str, Any], size: int) -> bool:
        """Continues where the saved state stopped, in this file or in the file it was
        rotated to meanwhile (from its start if that was truncated); False when the saved
        file is gone."""
        assert self._fd is not None
        inode, offset = _saved(saved, "inode", int, 0), _saved(saved, "offset", int, 0)
        fingerprint = _saved(saved, "fingerprint", str, "")
        fp_len = _saved(saved, "fingerprint_bytes", int, 0)
        skipping = _saved(saved, "skipping", bool, False)
        if min(inode, offset, fp_len) < 0 or fp_len > FINGERPRINT_BYTES:
            raise ValueError(f"out of range: inode {inode}, offset {offset}, "
                             f"fingerprint_bytes {fp_len}")
        if inode != self.inode:
            # rotated while we were down: finish the old file first if it is still here
            fd = self._open_inode(inode)
            if fd < 0:
                self.rotations["rename"] += 1
                return False
            os.close(self._fd)  # read_batch sees the path differ and finishes this one first
            st = os.fstat(fd)
            self._fd, self.inode, self.device, size = fd, st.st_ino, st.st_dev, st.st_size
        if size >= offset and size >= fp_len and self._fingerprint(
                self._fd, fp_len) == fingerprint:
            self.offset, self.fingerprint, self.fp_len = offset, fingerprint, fp_len
            self.skipping = skipping
        else:
            self.rotations["truncate"] += 1
        self._refresh_fingerprint(size)
        return True

    def _open_inode(self, inode: int) -> int:
        """An fd of the file with this inode beside the path (mail.log.1), or -1."""
        old = self._find_inode(inode)
        if old is None:
            return -1
        try:
            fd = _open_read(old)
        except OSError:
            return -1
        if os.fstat(fd).st_ino != inode:  # replaced between the scan and the open
            os.close(fd)
            return -1
        return fd

    def _find_inode(self, inode: int) -> Path | None:
        directory = self.path.parent
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if (entry.name.startswith(self.path.name) and entry.name != self.path.name
                            and entry.inode() == inode):
                        return Path(entry.path)
        except OSError:
            return None
        return None

    def _start_at_end(self, size: int) -> None:
        assert self._fd is not None
        self.offset = size
        # mid-line (the writer is appending right now): drop the rest of that line
        self.skipping = size > 0 and os.pread(self._fd, 1, size - 1) != b"\n"

    def _refresh_fingerprint(self, size: int) -> None:
        if self._fd is not None and self.fp_len < FINGERPRINT_BYTES and size > self.fp_len:
            self.fp_len = min(size, FINGERPRINT_BYTES)
            self.fingerprint = self._fingerprint(self._fd, self.fp_len)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- reading

    def read_batch(self) -> tuple[list[str], bool]:
        """The next complete lines (at most about batch_bytes) and whether more may be
        waiting. Raises OSError when the file cannot be read (and is not being rotated)."""
        if self._fd is None:
            self._open()  # raises FileNotFoundError while there is no file
        fd = self._fd
        assert fd is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None  # renamed away, the new one not created yet: keep reading the old
        size = os.fstat(fd).st_size
        if size < self.offset or size < self.fp_len or (
                self.fp_len and self._fingerprint(fd, self.fp_len) != self.fingerprint):
            self.rotations["truncate"] += 1
            self.offset, self.skipping, self.fingerprint, self.fp_len = 0, False, "", 0
        self._refresh_fingerprint(size)
        if st is not None and (st.st_ino, st.st_dev) != (self.inode, self.device):
            moved_on = st.st_size > 0  # the writer writes to the new file now
            lines, self.offset, self.skipping, more = self._read(
                fd, self.offset, self.skipping, final=moved_on)
            if more or not moved_on:
                return lines, more
            os.close(fd)
            self._fd = None
            self.rotations["rename"] += 1
            self._seen_missing = True  # the new file is read from its start
            self._restored = None
            return lines, True
        lines, self.offset, self.skipping, more = self._read(
            fd, self.offset, self.skipping, final=False)
        return lines, more

    def _read(self, fd: int, offset: int, skipping: bool, final: bool
              ) -> tuple[list[str], int, bool, bool]:
        """Lines from fd at offset; `final`: the writer has moved on, so a last line
        without a newline is complete. Returns (lines, new offset, skipping, more)."""
        data = os.pread(fd, self.batch_bytes, offset)
        full = len(data) == self.batch_bytes
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if full:  # one line longer than a batch: count it once, drop it to its end
                if not skipping:
                    self.overlong_lines += 1
                return [], offset + len(data), True, True
            if not (final and data):
                return [], offset, skipping, False
            cut = len(data)  # the writer moved on: its last line is complete without "\n"
            chunk = data + b"\n"
        else:
            chunk = data[:cut]
        if skipping:
            first = chunk.find(b"\n") + 1
            chunk = chunk[first:]
            skipping = False
        text = chunk.decode("utf-8", "replace")
        lines = text.split("\n")
        lines.pop()  # after the last newline: empty
        more = full or (final and len(data) > cut)
        return lines, offset + cut, skipping, more


# --------------------------------------------------------------------------- counting

MAX_OPEN_SESSIONS = 4096


class Batch(NamedTuple):
    """What one step read: auth events to report, lines read, whether more may wait."""

    auths: list[Auth]
    lines: int
    more: bool


class LogSource:
    """One configured file: its follower, its parser and its counters."""

    def __init__(self, name: str, path: str | Path, fmt: str,
                 state_dir: str | Path | None = None, *, feed_security: bool = True,
                 start_at: str = "end", batch_bytes: int = BATCH_BYTES):
        if fmt not in PARSERS:
            raise ValueError(f"unknown log format {fmt!r}; known: {', '.join(PARSERS)}")
        self.name, self.format, self.feed_security = name, fmt, feed_security
        self.parse = PARSERS[fmt]
        state_path = Path(state_dir) / "logs" / f"{name}.json" if state_dir else None
        self.follower = LogFollower(path, state_path, batch_bytes, start_at)
        self.lines = {"parsed": 0, "ignored": 0, "unparsed": 0}
        self.events: dict[Event, int] = {}  # Delivery, Reject, TlsFailure -> count
        self.auth: dict[tuple[str, str], int] = {}  # (service, result) -> count
        self.errors = {"read": 0, "state": 0, "report": 0}
        self._sessions: dict[str, None] = {}  # smtpd sessions whose AUTH success was reported
        self._last_error = ""
        # close() from the event loop (a reload) while a worker thread steps: the step
        # closes the follower when it ends, and no step runs after (it would reopen the file)
        self._lock = threading.Lock()
        self._closed = self._stepping = False

    @property
    def key(self) -> tuple[str, str, str]:
        return self.name, str(self.follower.path), self.format

    def ingest(self, lines: Iterable[str]) -> list[Auth]:
        """Parses and counts lines; returns the auth events for the security engine."""
        parse, events, sessions = self.parse, self.events, self._sessions
        parsed = ignored = unparsed = 0
        auths: list[Auth] = []
        for line in lines:
            try:
                event = parse(line)
            except Exception as exc:  # a parser bug costs one line (unparsed), not the batch
                self._warn(f"parse: {type(exc).__name__}: {exc}")
                event = UNPARSED
            if event is None:
                ignored += 1
            elif event.__class__ is Auth:
                parsed += 1
                auth = cast(Auth, event)
                if auth.session:
                    # counted at the session's end; reported once, with the first message
                    if auth.session in sessions:
                        continue
                    sessions[auth.session] = None
                    if len(sessions) > MAX_OPEN_SESSIONS:  # disconnect lines were lost
                        del sessions[next(iter(sessions))]
                else:
                    key = (auth.service, "success" if auth.success else "failure")
                    self.auth[key] = self.auth.get(key, 0) + auth.attempts
                auths.append(auth)
            elif event is UNPARSED:
                unparsed += 1
            elif event.__class__ is SessionEnd:
                end = cast(SessionEnd, event)
                sessions.pop(end.session, None)
                if end.auth_successes:
                    parsed += 1
                    key = (end.service, "success")
                    self.auth[key] = self.auth.get(key, 0) + end.auth_successes
                else:
                    ignored += 1
            else:
                parsed += 1
                events[event] = events.get(event, 0) + 1
        counts = self.lines
        counts["parsed"] += parsed
        counts["ignored"] += ignored
        counts["unparsed"] += unparsed
        return auths

    def step(self) -> Batch:
        """One batch: read, count, save the offset. Never raises: errors are counted.
        Nothing once closed (a reload dropped this source while a poll had it listed)."""
        with self._lock:
            if self._closed:
                return Batch([], 0, False)
            self._stepping = True
        try:
            return self._step()
        finally:
            with self._lock:
                self._stepping = False
                if self._closed:
                    self.follower.close()

    def _step(self) -> Batch:
        try:
            lines, more = self.follower.read_batch()
        except OSError as exc:
            self._error("read", exc)
            return Batch([], 0, False)
        auths = self.ingest(lines)
        overlong = self.follower.overlong_lines
        if overlong:  # lines longer than a batch were dropped: count them as unparsed
            self.lines["unparsed"] += overlong
            self.follower.overlong_lines = 0
        try:
            self.follower.save()
        except OSError as exc:
            self._error("state", exc)
        return Batch(auths, len(lines) + overlong, more)

    def _error(self, operation: str, exc: BaseException) -> None:
        self.errors[operation] += 1
        self._warn(f"{operation}: {type(exc).__name__}: {exc}")

    def _warn(self, text: str) -> None:
        if text != self._last_error:  # once per distinct problem, not once per poll
            log.warning("log ingestion problem", extra={"source": self.name, "error": text})
            self._last_error = text

    def close(self) -> None:
        """Closes the file now, or when the step in progress ends; later steps do nothing."""
        with self._lock:
            self._closed = True
            if self._stepping:
                return
        self.follower.close()

    def reopen(self) -> None:
        """Steps read again after close() (LogIngestion.start after stop)."""
        with self._lock:
            self._closed = False


# --------------------------------------------------------------------------- collector

AuthSink = Callable[[str, str, str, bool], Awaitable[object]]
"""on_auth(login, remote_ip, protocol, success): the one way log events reach the
security engine. Logs carry no password hash, so there every failure counts as a
distinct wrong password (as with Stalwart's webhooks)."""


class LogIngestion:
    """The log-ingestion engine and its collector (`name = "logs"`).

    Every poll_interval, each source is drained batch by batch: a batch is read, parsed
    and counted in a worker thread and its offset saved, then its auth events are awaited
    through on_auth on the event loop. Saving before reporting makes delivery to the
    engine at-most-once: a crash between the two loses one batch's logins rather than
    counting them twice. stop() lets the batch in progress finish its reports.
    """

    name = "logs"

    def __init__(self, sources: Iterable[LogSource] = (), poll_interval: float = 1.0,
                 on_auth: AuthSink | None = None, feed_security: bool = True):
        self.sources: list[LogSource] = list(sources)
        self.poll_interval = poll_interval
        self.on_auth = on_auth
        self.feed_security = feed_security
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @classmethod
    def from_config(cls, section: dict[str, Any], state_dir: str | Path,
                    on_auth: AuthSink | None = None) -> LogIngestion:
        """From the monitoring.logs section; on_auth None: nothing reaches an engine."""
        ingestion = cls(on_auth=on_auth)
        ingestion.configure(section, state_dir)
        return ingestion

    def configure(self, section: dict[str, Any], state_dir: str | Path) -> None:
        """Applies monitoring.logs (also on reload): a file whose name, path and format
        are unchanged keeps its follower and counters; the others start afresh."""
        self.poll_interval = parse_duration(section.get("poll_interval", "1s"))
        self.feed_security = bool(section.get("feed_security", True))
        current = {source.key: source for source in self.sources}
        sources = []
        for item in section.get("files", []):
            key = (item["name"], str(Path(item["path"])), item["format"])
            source = current.pop(key, None) or LogSource(
                item["name"], item["path"], item["format"], state_dir,
                start_at=item.get("start_at", "end"))
            source.feed_security = bool(item.get("feed_security", True))
            sources.append(source)
        for gone in current.values():
            gone.close()
        self.sources = sources

    # --- running

    async def poll_once(self) -> int:
        """Drains every source once (every waiting batch); returns the lines read."""
        total = 0
        for source in list(self.sources):
            more = True
            while more and not self._stopping.is_set():
                batch = await asyncio.to_thread(source.step)
                total += batch.lines
                more = batch.more
                if (batch.auths and self.on_auth is not None and self.feed_security
                        and source.feed_security):
                    await self._report(source, batch.auths)
        return total

    async def _report(self, source: LogSource, auths: list[Auth]) -> None:
        assert self.on_auth is not None
        for auth in auths:
            for _ in range(auth.attempts):
                try:
                    await self.on_auth(auth.login, auth.remote_ip, auth.service, auth.success)
                except Exception as exc:
                    source._error("report", exc)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.poll_once()
            except Exception:
                log.exception("log ingestion poll failed")
            with contextlib.suppress(TimeoutError):
                await bounded(self._stopping.wait(), self.poll_interval)

    async def start(self) -> None:
        if self._task is None:
            for source in self.sources:
                source.reopen()
            self._stopping = asyncio.Event()
            self._task = tracing.detached_task(self._run(), "log-ingestion")

    async def stop(self, timeout: float = 10.0) -> None:
        """Lets the batch in progress finish (its reports included), then closes files."""
        if self._task is not None:
            self._stopping.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        for source in self.sources:
            source.close()

    # --- scrape

    def collect(self) -> Iterator[Metric]:
        lines = catalogue.family("a3mailer_log_lines_total")
        deliveries = catalogue.family("a3mailer_mail_deliveries_total")
        rejects = catalogue.family("a3mailer_mail_rejects_total")
        auth = catalogue.family("a3mailer_auth_events_total")
        tls = catalogue.family("a3mailer_tls_failures_total")
        errors = catalogue.family("a3mailer_log_follow_errors_total")
        rotations = catalogue.family("a3mailer_log_rotations_total")
        offset = catalogue.family("a3mailer_log_offset_bytes")
        for source in list(self.sources):
            name = source.name
            for result, value in dict(source.lines).items():
                lines.add_metric([name, result], value)
            events = dict(source.events)  # a C-level copy: a worker thread may be counting
            if source.format != "dovecot":
                for status in DELIVERY_STATUSES:
                    deliveries.add_metric([name, status], events.get(_DELIVERIES[status], 0))
            for event, value in events.items():
                if isinstance(event, Reject):
                    rejects.add_metric([name, event.cls, event.stage], value)
                elif isinstance(event, TlsFailure):
                    tls.add_metric([name, event.service], value)
            for (service, result), value in dict(source.auth).items():
                auth.add_metric([name, service, result], value)
            for operation, value in dict(source.errors).items():
                errors.add_metric([name, operation], value)
            for kind, value in dict(source.follower.rotations).items():
                rotations.add_metric([name, kind], value)
            offset.add_metric([name], source.follower.offset)
        yield from (lines, deliveries, rejects, auth, tls, errors, rotations, offset)
