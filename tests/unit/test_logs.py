"""Log ingestion (exporter/collectors/logs.py): the Postfix, Dovecot, Stalwart and mixed
syslog parsers on realistic lines, the follower across rotation and restarts, counting
(one login never twice) and the exported label sets.

Postfix 3.7 and Dovecot 2.3.19 lines are the ones the real servers of the integration
harness wrote (host names and addresses changed where a case needs it); Stalwart lines
follow its text logger (`<RFC3339> <LEVEL> <description> (<event.name>) key = value,
...`, camelCase keys, strings quoted, IPs bare).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.collectors.logs import (
    MAX_ATTEMPTS_PER_LINE,
    PARSERS,
    UNPARSED,
    Auth,
    Delivery,
    LogFollower,
    LogIngestion,
    LogSource,
    Reject,
    SessionEnd,
    TlsFailure,
    parse_dovecot,
    parse_maillog,
    parse_postfix,
    parse_stalwart,
)
from exporter.exposition import render_text

PF = "Dec  1 07:54:43 mx postfix"
DC = "Dec 01 07:54:40"  # Dovecot's own log_path: no host, no program tag
SL = "2026-11-25T10:49:25Z"


# --------------------------------------------------------------------------- Postfix

DELIVERIES = [
    # smtp, lmtp, local, virtual, error: one line per recipient, by status
    (f"{PF}/smtp[2101]: 4A1B320C734: to=<bob@example.net>, relay=mx.example.net[192.0.2.25]"
     ":25, delay=0.42, delays=0.02/0.01/0.2/0.19, dsn=2.0.0, status=sent (250 2.0.0 Ok: "
     "queued as 9F1E3C0012)", "sent"),
    (f"{PF}/lmtp[21033]: 908D820C734: to=<alice@example.test>, relay=127.0.0.1[127.0.0.1]:"
     "43695, delay=0.11, delays=0.01/0.02/0.02/0.06, dsn=2.0.0, status=sent (250 2.0.0 "
     "<alice@example.test> p8XbJUN9DmsqUgAAg+zDdQ Saved)", "sent"),
    (f"{PF}/local[2210]: 5B2C420C735: to=<root@mx.example.test>, orig_to=<root>, "
     "relay=local, delay=0.03, delays=0.01/0.01/0/0.01, dsn=2.0.0, status=sent (delivered "
     "to mailbox)", "sent"),
    (f"{PF}/virtual[2211]: 5B2C420C736: to=<carol@example.test>, relay=virtual, delay=0.02, "
     "delays=0.01/0/0/0.01, dsn=2.0.0, status=sent (delivered to maildir)", "sent"),
    (f"{PF}/smtp[2102]: 6C3D520C736: to=<carol@example.org>, relay=none, delay=30, "
     "delays=0.01/0.01/30/0, dsn=4.4.1, status=deferred (connect to mx.example.org"
     "[198.51.100.7]:25: Connection timed out)", "deferred"),
    (f"{PF}/lmtp[2103]: 6C3D520C737: to=<dave@example.test>, relay=127.0.0.1[127.0.0.1]:24,"
     " delay=0.31, delays=0.2/0/0/0.1, dsn=4.2.2, status=deferred (host 127.0.0.1[127.0.0.1]"
     " said: 452 4.2.2 <dave@example.test> Mailbox is full (in reply to end of DATA "
     "command))", "deferred"),
    (f"{PF}/smtp[2103]: 7D4E620C737: to=<nobody@example.com>, relay=mx.example.com"
     "[203.0.113.5]:25, delay=1.1, delays=0.01/0/0.6/0.5, dsn=5.1.1, status=bounced (host "
     "mx.example.com[203.0.113.5] said: 550 5.1.1 <nobody@example.com>: Recipient address "
     "rejected: User unknown (in reply to RCPT TO command))", "bounced"),
    (f"{PF}/error[2104]: 8E5F720C738: to=<x@example.test>, relay=none, delay=0.01, "
     "delays=0/0/0/0, dsn=5.0.0, status=bounced (User unknown in virtual mailbox table)",
     "bounced"),
    (f"{PF}/lmtp[2105]: 8E5F720C739: to=<erin@example.test>, relay=127.0.0.1[127.0.0.1]:24,"
     " delay=0.2, delays=0.1/0/0/0.1, dsn=5.2.2, status=bounced (host 127.0.0.1[127.0.0.1] "
     "said: 552 5.2.2 <erin@example.test> Quota exceeded (in reply to end of DATA command))",
     "bounced"),
    (f"{PF}/qmgr[1201]: 9F60820C739: from=<alice@example.test>, status=expired, returned to "
     "sender", "expired"),
]


@pytest.mark.parametrize("line, status", DELIVERIES)
def test_postfix_deliveries_by_status(line, status):
    assert parse_postfix(line) == Delivery(status)
    assert parse_maillog(line) == Delivery(status)


# The sender chooses to=, orig_to= and from= (Postfix quotes a local part holding ", " or
# "<>"); a status= inside them is not the status.
@pytest.mark.parametrize("line, expected", [
    (f"{PF}/local[9]: 4F1A2B3C: to=<catch@ex.org>, orig_to=<\"x, status=bounced \"@ex.org>, "
     "relay=local, delay=0.1, delays=0/0/0/0, dsn=2.0.0, status=sent (delivered to mailbox)",
     Delivery("sent")),
    (f"{PF}/smtp[9]: 4F1A2B3C: to=<\"a>, status=bounced, \\\" <b\"@ex.org>, relay=mx.ex.org"
     "[192.0.2.25]:25, delay=0.4, delays=0/0/0.2/0.2, dsn=4.4.1, status=deferred (timeout)",
     Delivery("deferred")),
    (f"{PF}/qmgr[9]: 4F1A2B3C: from=<\"x, status=expired, \"@ex.org>, size=692, nrcpt=1 "
     "(queue active)", None),
    (f"{PF}/qmgr[9]: 4F1A2B3C: from=<\"x>, status=sent\"@ex.org>, status=expired, returned "
     "to sender", Delivery("expired")),
    (f"{PF}/local[9]: 4F1A2B3C: to=<\"unterminated, status=sent (x)", None),
])
def test_a_status_inside_an_address_is_not_the_status(line, expected):
    assert parse_postfix(line) == expected
    assert parse_maillog(line) == expected


REJECTS = [
    (f"{PF}/smtpd[3001]: NOQUEUE: reject: CONNECT from unknown[203.0.113.9]: 554 5.7.1 "
     "Service unavailable; Client host [203.0.113.9] blocked using zen.spamhaus.org; "
     "https://www.spamhaus.org/query/ip/203.0.113.9; proto=SMTP", "5xx", "connect"),
    (f"{PF}/smtpd[3001]: NOQUEUE: reject: CONNECT from unknown[203.0.113.9]: 450 4.7.1 "
     "Client host rejected: cannot find your hostname, [203.0.113.9]; proto=SMTP",
     "4xx", "connect"),
    (f"{PF}/smtpd[3002]: NOQUEUE: reject: EHLO from unknown[203.0.113.9]: 504 5.5.2 "
     "<localhost>: Helo command rejected: need fully-qualified hostname; proto=SMTP "
     "helo=<localhost>", "5xx", "helo"),
    (f"{PF}/smtpd[3002]: NOQUEUE: reject: HELO from unknown[203.0.113.9]: 450 4.7.1 "
     "<bad.example>: Helo command rejected: Host not found; proto=SMTP helo=<bad.example>",
     "4xx", "helo"),
    (f"{PF}/submission/smtpd[3003]: NOQUEUE: reject: MAIL from unknown[203.0.113.9]: 553 "
     "5.7.1 <alice@example.test>: Sender address rejected: not logged in; "
     "from=<alice@example.test> proto=ESMTP helo=<pc>", "5xx", "mail"),
    (f"{PF}/smtpd[3003]: NOQUEUE: reject: MAIL from unknown[203.0.113.9]: 452 4.3.1 "
     "Insufficient system storage; from=<a@example.net> proto=ESMTP helo=<pc>",
     "4xx", "mail"),
    (f"{PF}/smtpd[3004]: NOQUEUE: reject: RCPT from unknown[203.0.113.9]: 550 5.1.1 "
     "<nobody@example.test>: Recipient address rejected: User unknown in virtual mailbox "
     "table; from=<a@example.net> to=<nobody@example.test> proto=ESMTP helo=<pc>",
     "5xx", "rcpt"),
    (f"{PF}/smtpd[3004]: NOQUEUE: reject: RCPT from unknown[2001:db8::9]: 454 4.7.1 "
     "<x@elsewhere.test>: Relay access denied; from=<a@example.net> to=<x@elsewhere.test> "
     "proto=ESMTP helo=<pc>", "4xx", "rcpt"),
    (f"{PF}/smtpd[3005]: NOQUEUE: reject: DATA from unknown[203.0.113.9]: 550 5.5.3 <DATA>:"
     " Data command rejected: Multi-recipient bounce; from=<> proto=ESMTP helo=<pc>",
     "5xx", "data"),
    (f"{PF}/smtpd[3005]: NOQUEUE: reject: DATA from unknown[203.0.113.9]: 451 4.3.0 <DATA>:"
     " Data command rejected: try again; from=<a@example.net> proto=ESMTP helo=<pc>",
     "4xx", "data"),
    (f"{PF}/smtpd[3006]: 3B2C420C740: reject: END-OF-MESSAGE from unknown[203.0.113.9]: "
     "552 5.3.4 Message size exceeds fixed limit; from=<a@example.net> to=<b@example.test> "
     "proto=ESMTP helo=<pc>", "5xx", "end-of-message"),
    (f"{PF}/smtpd[3006]: 3B2C420C741: milter-reject: END-OF-MESSAGE from localhost"
     "[127.0.0.1]: 4.7.1 Try again later; from=<a@example.net> to=<b@example.test> "
     "proto=ESMTP helo=<pc>", "4xx", "end-of-message"),
    (f"{PF}/cleanup[3007]: 4C3D520C741: milter-reject: END-OF-MESSAGE from unknown"
     "[203.0.113.9]: 5.7.1 Spam message rejected; from=<a@example.net> to=<b@example.test> "
     "proto=ESMTP helo=<pc>", "5xx", "end-of-message"),
    (f"{PF}/smtpd[3008]: NOQUEUE: milter-reject: RCPT from unknown[203.0.113.9]: 451 4.7.1 "
     "Greylisting in action, please come back later; from=<a@example.net> "
     "to=<b@example.test> proto=ESMTP helo=<pc>", "4xx", "rcpt"),
    (f"{PF}/smtpd[3009]: NOQUEUE: reject: VRFY from unknown[203.0.113.9]: 550 5.1.1 <bob>: "
     "Recipient address rejected: User unknown; to=<bob> proto=SMTP", "5xx", "vrfy"),
    (f"{PF}/smtpd[3009]: NOQUEUE: reject: ETRN from unknown[203.0.113.9]: 554 5.7.1 "
     "<example.test>: Etrn command rejected: Access denied; proto=ESMTP helo=<pc>",
     "5xx", "etrn"),
    (f"{PF}/cleanup[3010]: 5D4E620C742: reject: header Subject: You won from unknown"
     "[203.0.113.9]; from=<a@example.net> to=<b@example.test> proto=ESMTP helo=<pc>: 5.7.1 "
     "Spam subject", "5xx", "header"),
    (f"{PF}/cleanup[3010]: 5D4E620C743: reject: body Click here to claim 550 prizes from "
     "unknown[203.0.113.9]; from=<a@example.net> to=<b@example.test> proto=ESMTP helo=<pc>:"
     " 5.7.1 message content rejected", "5xx", "body"),
    (f"{PF}/postscreen[3011]: NOQUEUE: reject: RCPT from [203.0.113.9]:52344: 550 5.7.1 "
     "Service unavailable; client [203.0.113.9] blocked using zen.spamhaus.org; "
     "from=<a@example.net>, to=<b@example.test>, proto=ESMTP, helo=<pc>", "5xx", "rcpt"),
    (f"{PF}/postscreen[3011]: NOQUEUE: reject: RCPT from [203.0.113.9]:52345: 450 4.3.2 "
     "Service currently unavailable; from=<a@example.net>, to=<b@example.test>, "
     "proto=ESMTP, helo=<pc>", "4xx", "rcpt"),
    (f"{PF}/smtpd[3012]: NOQUEUE: reject: BDAT from unknown[203.0.113.9]: 554 5.5.1 Error: "
     "no valid recipients; from=<a@example.net> proto=ESMTP helo=<pc>", "5xx", "other"),
]


@pytest.mark.parametrize("line, cls, stage", REJECTS)
def test_postfix_rejects_by_class_and_stage(line, cls, stage):
    assert parse_postfix(line) == Reject(cls, stage)
    assert parse_maillog(line) == Reject(cls, stage)


SASL = f"{PF}/submission/smtpd[20526]"


@pytest.mark.parametrize("line, expected", [
    (f"{SASL}: warning: unknown[127.0.0.10]: SASL PLAIN authentication failed: (reason "
     "unavailable), sasl_username=alice@example.test",
     Auth("submission", False, "alice@example.test", "127.0.0.10")),
    (f"{SASL}: warning: unknown[203.0.113.9]: SASL LOGIN authentication failed: UGFzc3dvcmQ6",
     Auth("submission", False, "", "203.0.113.9")),
    (f"{PF}/smtpd[20521]: warning: mail.example.net[2001:db8::25]: SASL CRAM-MD5 "
     "authentication failed: authentication failure, sasl_username=bob",
     Auth("smtp", False, "bob", "2001:db8::25")),
    (f"{PF}/smtps/smtpd[20527]: warning: unknown[203.0.113.9]: SASL PLAIN authentication "
     "failed: (reason unavailable), sasl_username=carol@example.test",
     Auth("smtps", False, "carol@example.test", "203.0.113.9")),
    (f"{PF}/submissions/smtpd[20528]: warning: unknown[203.0.113.9]: SASL PLAIN "
     "authentication failed: (reason unavailable), sasl_username=dave",
     Auth("submissions", False, "dave", "203.0.113.9")),
    (f"{PF}-out/smtpd[20529]: warning: unknown[203.0.113.9]: SASL PLAIN authentication "
     "failed: (reason unavailable), sasl_username=erin",  # a custom syslog_name
     Auth("smtp", False, "erin", "203.0.113.9")),
])
def test_postfix_sasl_failures(line, expected):
    assert parse_postfix(line) == expected


def test_postfix_sasl_success_names_the_login_for_the_engine_and_the_session():
    line = (f"{SASL}: 908D820C734: client=localhost[127.0.0.1], sasl_method=PLAIN, "
            "sasl_username=alice@example.test")
    assert parse_postfix(line) == Auth("submission", True, "alice@example.test", "127.0.0.1",
                                       1, "postfix/submission/smtpd[20526]")


@pytest.mark.parametrize("line, expected", [
    (f"{SASL}: disconnect from localhost[127.0.0.1] ehlo=2 starttls=1 auth=1 mail=1 rcpt=1 "
     "data=1 quit=1 commands=8", SessionEnd("postfix/submission/smtpd[20526]", "submission",
                                            1)),
    (f"{SASL}: disconnect from localhost[127.0.0.1] ehlo=2 starttls=1 auth=1 quit=1 "
     "commands=5", SessionEnd("postfix/submission/smtpd[20526]", "submission", 1)),
    (f"{SASL}: disconnect from unknown[127.0.0.10] ehlo=2 starttls=1 auth=0/1 commands=3/4",
     SessionEnd("postfix/submission/smtpd[20526]")),
    (f"{PF}/smtpd[20521]: disconnect from localhost[127.0.0.1] ehlo=1 quit=1 commands=2",
     SessionEnd("postfix/smtpd[20521]")),
])
def test_postfix_disconnect_carries_the_sessions_auth_successes(line, expected):
    assert parse_postfix(line) == expected


@pytest.mark.parametrize("line, expected", [
    (f"{PF}/smtpd[20521]: SSL_accept error from localhost[127.0.0.1]: lost connection",
     TlsFailure("smtp")),
    (f"{SASL}: SSL_accept error from unknown[203.0.113.9]: -1", TlsFailure("submission")),
    (f"{PF}/smtp[2107]: SSL_connect error to mx.example.org[198.51.100.7]:25: -1",
     TlsFailure("smtp_client")),
    (f"{PF}/lmtp[2108]: SSL_connect error to 127.0.0.1[127.0.0.1]:24: lost connection",
     TlsFailure("smtp_client")),
])
def test_postfix_tls_failures(line, expected):
    assert parse_postfix(line) == expected


POSTFIX_IGNORED = [
    f"{PF}/master[20517]: daemon started -- version 3.7.11, configuration /etc/postfix",
    f"{PF}/smtpd[20521]: connect from localhost[127.0.0.1]",
    f"{PF}/smtpd[20521]: Anonymous TLS connection established from localhost[127.0.0.1]: "
    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 "
    "server-signature ECDSA (prime256v1) server-digest SHA256",
    f"{PF}/smtpd[20521]: lost connection after STARTTLS from localhost[127.0.0.1]",
    f"{PF}/smtpd[20521]: 908D820C734: client=localhost[127.0.0.1]",
    f"{PF}/cleanup[21032]: 908D820C734: message-id=<179611168359.20441@example.test>",
    f"{PF}/qmgr[20519]: 908D820C734: from=<alice@example.test>, size=692, nrcpt=1 (queue "
    "active)",
    f"{PF}/qmgr[20519]: 908D820C734: removed",
    f"{PF}/bounce[2108]: 7D4E620C737: sender non-delivery notification: B182A20C73B",
    f"{PF}/smtp[2105]: A071920C73A: to=<x@example.net>, relay=mx.example.net[192.0.2.25]:25,"
    " delay=0.5, delays=0/0/0.3/0.2, dsn=2.1.5, status=deliverable (250 2.1.5 Ok)",
    f"{PF}/smtp[2106]: connect to mx.example.org[198.51.100.7]:25: Connection refused",
    f"{PF}/smtpd[3001]: NOQUEUE: reject_warning: RCPT from unknown[203.0.113.9]: 450 4.7.1 "
    "Client host rejected: cannot find your hostname; from=<reject: x@example.net> "
    "to=<b@example.test> proto=ESMTP helo=<pc>",
    f"{PF}/smtpd[3001]: warning: hostname mail.example.net does not resolve to address "
    "203.0.113.9: Name or service not known",
    f"{SASL}: warning: unknown[203.0.113.9]: SASL PLAIN authentication failed: Connection "
    "lost to authentication server",
    f"{SASL}: warning: unknown[203.0.113.9]: SASL FOO authentication failed: Invalid "
    "authentication mechanism",
    f"{PF}/smtpd[3001]: warning: SASL authentication failure: Password verification failed",
    f"{PF}/postscreen[3011]: CONNECT from [203.0.113.9]:52344 to [192.0.2.1]:25",
    f"{PF}/postscreen[3011]: DNSBL rank 3 for [203.0.113.9]:52344",
    f"{PF}/anvil[1300]: statistics: max connection rate 3/60s for (smtp:203.0.113.9) at Dec "
    " 1 10:49:25",
    "Dec  1 07:54:43 mx opendkim[812]: 908D820C734: DKIM-Signature field added",
    "Dec  1 07:54:43 mx CRON[4410]: (root) CMD (command -v debian-sa1 > /dev/null)",
    "",
]


@pytest.mark.parametrize("line", POSTFIX_IGNORED)
def test_postfix_lines_it_ignores(line):
    assert parse_postfix(line) is None
    assert parse_maillog(line) is None


# Text a client sent, which Postfix quotes in some lines: none of it may be counted.
INJECTED = "client=x[192.0.2.66], sasl_username=victim reject: RCPT from x[192.0.2.66]: 550 " \
           "5.1.1 x: SASL PLAIN authentication failed: x, sasl_username=victim status=sent"


@pytest.mark.parametrize("line", [
    f"{PF}/smtpd[20521]: improper command pipelining after CONNECT from localhost"
    f"[127.0.0.1]: {INJECTED}",
    f"{PF}/smtpd[20521]: warning: non-SMTP command from localhost[127.0.0.1]: {INJECTED}",
    f"{PF}/smtpd[20521]: lost connection after DATA (0 bytes) from localhost[127.0.0.1]: "
    f"{INJECTED}",
    f"{PF}/cleanup[3010]: 5D4E620C742: warning: header Subject: {INJECTED} from "
    "unknown[203.0.113.9]; from=<a@example.net> to=<b@example.test> proto=ESMTP helo=<pc>",
])
def test_client_text_quoted_in_a_postfix_line_is_never_counted(line):
    assert parse_postfix(line) is None


@pytest.mark.parametrize("line", [
    f"{PF}/smtpd[3001]: NOQUEUE: reject: RCPT from unknown[203.0.113.9]: no reply code here",
    f"{PF}/cleanup[3010]: 5D4E620C742: reject: header Subject: x from unknown[203.0.113.9]",
    f"{SASL}: warning: unknown[not-an-ip]: SASL PLAIN authentication failed: x",
    f"{SASL}: 908D820C734: client=localhost[999.1.1.1], sasl_method=PLAIN, sasl_username=a",
    f"{SASL}: 908D820C734: client=localhost, sasl_method=PLAIN, sasl_username=a",
    "a line with no colon and space at all",
])
def test_malformed_postfix_lines_are_unparsed(line):
    assert parse_postfix(line) is UNPARSED


# --------------------------------------------------------------------------- Dovecot

LOGIN = ("imap-login: Info: Login: user=<alice@example.test>, method=PLAIN, rip=127.0.0.1, "
         "lip=127.0.0.1, mpid=20560, TLS, session=<8E6u1o1hjMF/AAAB>")


@pytest.mark.parametrize("line, expected", [
    (f"{DC} {LOGIN}", Auth("imap", True, "alice@example.test", "127.0.0.1")),
    (f"{DC} pop3-login: Info: Login: user=<alice@example.test>, method=PLAIN, rip=127.0.0.1, "
     "lip=127.0.0.1, mpid=20565, secured, session=<x9W11o1hhN9/AAAB>",
     Auth("pop3", True, "alice@example.test", "127.0.0.1")),
    ("Dec  1 07:54:40 mx dovecot: imap-login: Login: user=<bob@example.test>, method=PLAIN, "
     "rip=2001:db8::7, lip=2001:db8::1, mpid=20560, TLS, session=<8E6u1o1hjMF/AAAB>",
     Auth("imap", True, "bob@example.test", "2001:db8::7")),
    (f"{DC} submission-login: Info: Login: user=<carol>, method=PLAIN, rip=192.0.2.7, "
     "lip=192.0.2.1, mpid=1, TLS, session=<abc>", Auth("submission", True, "carol",
                                                      "192.0.2.7")),
    (f"{DC} managesieve-login: Info: Login: user=<carol>, method=PLAIN, rip=192.0.2.7, "
     "lip=192.0.2.1, mpid=1, session=<abc>", Auth("managesieve", True, "carol", "192.0.2.7")),
    (f"{DC} imap-login: Info: Disconnected: Connection closed (auth failed, 1 attempts in 0 "
     "secs): user=<alice@example.test>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, TLS: "
     "Connection closed, session=<m1Wv1o1h7Jd/AAAB>",
     Auth("imap", False, "alice@example.test", "127.0.0.1")),
    ("Dec  1 07:54:40 mx dovecot: imap-login: Disconnected: Aborted login by logging out "
     "(auth failed, 3 attempts in 14 secs): user=<admin@example.test>, method=PLAIN, "
     "rip=203.0.113.9, lip=192.0.2.1, TLS, session=<AbCd>",
     Auth("imap", False, "admin@example.test", "203.0.113.9", 3)),
    (f"{DC} pop3-login: Info: Disconnected (auth failed, 2 attempts in 6 secs): "
     "user=<bob@example.test>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.1, session=<AbCd>",
     Auth("pop3", False, "bob@example.test", "203.0.113.9", 2)),
    (f"{DC} imap-login: Info: Disconnected (auth failed, 5000 attempts in 600 secs): "
     "user=<bob>, method=PLAIN, rip=203.0.113.9, lip=192.0.2.1, session=<AbCd>",
     Auth("imap", False, "bob", "203.0.113.9", MAX_ATTEMPTS_PER_LINE)),
    # the user name is the client's: an address inside it is not the client's address
    (f"{DC} imap-login: Info: Login: user=<x, rip=192.0.2.66, >, method=PLAIN, "
     "rip=203.0.113.9, lip=192.0.2.1, mpid=1, session=<AbCd>",
     Auth("imap", True, "x, rip=192.0.2.66, ", "203.0.113.9")),
])
def test_dovecot_logins_and_failures(line, expected):
    assert parse_dovecot(line) == expected
    assert parse_maillog(line) == expected


# Dovecot 2.3.19 writes the client's user name between <> unescaped (control characters
# become "?"; more than 80 bytes end in "..."); these are its lines for AUTHENTICATE PLAIN
# with such names, with the default login_log_format_elements ("user=<%u> method=%m
# rip=%r lip=%l mpid=%e %c session=<%{session}>") and with %u after %r ("rip=%r lip=%l
# user=<%u> method=%m mpid=%e %c session=<%{session}>").
FORGED = "x>, rip=10.9.9.9, lip=10.9.9.8, user=<victim"
FAILED = ("imap-login: Info: Disconnected: Aborted login by logging out (auth failed, 1 attempts "
          "in 0 secs): ")


@pytest.mark.parametrize("fields, login", [
    # user first (the default order)
    (f"user=<{FORGED}>, method=PLAIN, rip=127.0.0.10, lip=127.0.0.1, "
     "session=<eVSrHa1hr91/AAAK>", FORGED),
    ('user=<a", rip=10.9.9.9 "b?<>>, method=PLAIN, rip=127.0.0.10, lip=127.0.0.1, '
     "session=<UsazHa1h56Z/AAAL>", 'a", rip=10.9.9.9 "b?<>'),
    ("user=<x>, method=PLAIN, rip=10.9.9.9, session=<y>, method=PLAIN, rip=127.0.0.10, "
     "lip=127.0.0.1, session=<eVSrHa1hr91/AAAK>", "x>, method=PLAIN, rip=10.9.9.9, session=<y"),
    # user after rip
    (f"rip=127.0.0.10, lip=127.0.0.1, user=<{FORGED}>, method=PLAIN, "
     "session=<eVSrHa1hr91/AAAK>", FORGED),
    ('rip=127.0.0.10, lip=127.0.0.1, user=<a", rip=10.9.9.9 "b?<>>, method=PLAIN, '
     "session=<UsazHa1h56Z/AAAL>", 'a", rip=10.9.9.9 "b?<>'),
    ("rip=127.0.0.10, lip=127.0.0.1, user=<x>, method=PLAIN, rip=10.9.9.9>, method=PLAIN, "
     "session=<eVSrHa1hr91/AAAK>", "x>, method=PLAIN, rip=10.9.9.9"),
    (f"rip=127.0.0.10, lip=127.0.0.1, user=<{FORGED}>", FORGED),
    ("rip=127.0.0.10, user=<y>, method=PLAIN, rip=10.9.9.9, session=<z>, method=PLAIN, "
     "session=<eVSrHa1hr91/AAAK>", "y>, method=PLAIN, rip=10.9.9.9, session=<z"),
    (f"rip=127.0.0.10, user=<{'y' * 77}...>, method=PLAIN, session=<LgnDHa1haed/AAAN>",
     "y" * 77 + "..."),
])
@pytest.mark.parametrize("message, success", [(FAILED, False), ("imap-login: Info: Login: ", True)],
                         ids=["failure", "login"])
def test_a_user_name_never_sets_the_dovecot_client_address(fields, login, message, success):
    """In either element order the address is Dovecot's rip= and the login the whole name."""
    assert parse_dovecot(f"{DC} {message}{fields}") == Auth("imap", success, login, "127.0.0.10")


@pytest.mark.parametrize("line, service", [
    (f"{DC} imap-login: Info: Disconnected (no auth attempts in 0 secs): user=<>, "
     "rip=203.0.113.9, lip=192.0.2.1, TLS handshaking: SSL_accept() failed: "
     "error:0A000076:SSL routines::no suitable signature algorithm, session=<AbCd>", "imap"),
    ("Dec  1 07:54:40 mx dovecot: pop3-login: Disconnected: Connection closed: SSL_accept() "
     "failed: error:0A00010B:SSL routines::wrong version number (no auth attempts in 0 secs):"
     " user=<>, rip=203.0.113.9, lip=192.0.2.1, TLS handshaking: SSL_accept() failed: "
     "error:0A00010B:SSL routines::wrong version number, session=<AbCd>", "pop3"),
])
def test_dovecot_tls_failures(line, service):
    assert parse_dovecot(line) == TlsFailure(service)


DOVECOT_IGNORED = [
    f"{DC} master: Info: Dovecot v2.3.19.1 (9b53102964) starting up for imap, pop3, lmtp",
    f"{DC} auth: Info: passwd-file(alice@example.test,127.0.0.10): Password mismatch",
    f"{DC} auth: Info: passwd-file(alice@example.test,127.0.0.1,<m1Wv1o1h7Jd/AAAB>): "
    "Password mismatch",
    f"{DC} auth: Info: passwd-file(nobody,203.0.113.9,<AbCd>): unknown user",
    f"{DC} imap(alice@example.test)<20560><8E6u1o1hjMF/AAAB>: Info: Disconnected: Logged out "
    "in=28 out=779 deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0",
    f"{DC} lmtp(21034): Info: Connect from 127.0.0.1",
    f"{DC} lmtp(alice@example.test)<21034><p8XbJUN9DmsqUgAAg+zDdQ>: Info: msgid=<1796@example"
    ".test>: saved mail to INBOX",
    f"{DC} imap-login: Info: Disconnected (no auth attempts in 0 secs): user=<>, "
    "rip=203.0.113.9, lip=192.0.2.1, session=<AbCd>",
    f"{DC} imap-login: Info: Disconnected (disconnected before auth was ready, waited 0 "
    "secs): user=<>, rip=203.0.113.9, lip=192.0.2.1, session=<AbCd>",
    # a client-chosen user name that looks like a failure report is not one
    f"{DC} imap-login: Info: Disconnected: Aborted login (no auth attempts in 0 secs): "
    "user=<x (auth failed, 50 attempts in 1 secs)>, rip=203.0.113.9, lip=192.0.2.1",
    f"{DC} master: Warning: Killed with signal 15 (by pid=20441 uid=0 code=kill)",
    "",
]


@pytest.mark.parametrize("line", DOVECOT_IGNORED)
def test_dovecot_lines_it_ignores(line):
    assert parse_dovecot(line) is None
    assert parse_maillog(line) is None


# Text a client chose that Dovecot writes into a line (real Dovecot 2.3.19 lines: lmtp logs
# the Message-ID, the auth process with auth_verbose=yes quotes a refused user name): it
# holds "x-login: " but is not a login process's line, so it never counts as a login.
FORGED_LOGINS = [
    "lmtp(alice@example.test)<32116><AbCd>: Info: msgid=<x-login: Disconnected (auth failed, "
    "99 attempts in 1 secs): user=<v>, rip=198.51.100.7, a@ex.org>: saved mail to INBOX",
    "lmtp(alice@example.test)<32116><AbCd>: Info: msgid=<x-login: Login: user=<victim>, "
    "rip=198.51.100.7, a@ex.org>: saved mail to INBOX",
    "auth: Info: plain(?,127.0.0.1,<sess>): Username character disallowed by "
    "auth_username_chars: 0x22 (username: a-login: Login: user=<victim@example.test>, "
    "rip=198.51.100.9, x)",
    # a user name in a process's prefix (auth_username_chars emptied by the operator)
    "lmtp(x imap-login: Login: user=<victim>, rip=198.51.100.7, y)<1><AbCd>: Info: "
    "Connect from 127.0.0.1",
]


@pytest.mark.parametrize("line", [f"{DC} {text}" for text in FORGED_LOGINS] + [
    f"Dec  1 07:54:40 mx dovecot{pid}: {text.replace('Info: ', '')}"
    for text in FORGED_LOGINS for pid in ("", "[812]")])
def test_client_text_that_looks_like_a_dovecot_login_is_never_one(line):
    assert parse_dovecot(line) is None
    assert parse_maillog(line) is None
    source, auths = ingest("maillog", [line])
    assert auths == [] and source.auth == {}


@pytest.mark.parametrize("line", [
    f"{DC} imap-login: Info: Login: user=<alice>, method=PLAIN, rip=not-an-ip, lip=x",
    f"{DC} imap-login: Info: Login: user=<alice>, method=PLAIN",
    f"{DC} imap-login: Info: Disconnected (auth failed, many attempts in 2 secs): user=<a>, "
    "rip=203.0.113.9",
    f"{DC} imap-login: Info: Disconnected (auth failed, ² attempts in 2 secs): user=<a>, "
    "rip=203.0.113.9",
    f"{DC} imap-login: Info: Disconnected (auth failed, {'9' * 5000} attempts in 2 secs): "
    "user=<a>, rip=203.0.113.9",
    f"{DC} imap-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<a>",
    "garbage without any separator",
])
def test_malformed_dovecot_lines_are_unparsed(line):
    assert parse_dovecot(line) is UNPARSED


# --------------------------------------------------------------------------- Stalwart

SPAN = 'listenerId = "{listener}", localPort = 143, remoteIp = {ip}, remotePort = 51234'


def stalwart(event: str, description: str = "Event", keys: str = "", level: str = "INFO",
             listener: str = "imap", ip: str = "192.0.2.7") -> str:
    span = SPAN.format(listener=listener, ip=ip)
    return f"{SL} {level} {description} ({event}) {span}{', ' + keys if keys else ''}"


@pytest.mark.parametrize("line, expected", [
    (stalwart("auth.success", "Authentication successful", 'accountName = "john", '
              "accountId = 12"), Auth("imap", True, "john", "192.0.2.7")),
    (stalwart("auth.failed", "Authentication failed", 'accountName = "john"',
              listener="submission", ip="2001:db8::7"),
     Auth("submission", False, "john", "2001:db8::7")),
    (stalwart("auth.failed", "Authentication failed", 'accountName = "john"', listener="smtp-in"),
     Auth("smtp", False, "john", "192.0.2.7")),
    (stalwart("auth.failed", "Authentication failed", 'accountName = "x"', listener="pop3s"),
     Auth("pop3", False, "x", "192.0.2.7")),
    (stalwart("auth.failed", "Authentication failed", 'accountName = "x"', listener="https"),
     Auth("http", False, "x", "192.0.2.7")),
    (stalwart("auth.failed", "Authentication failed", 'accountName = "x"', listener="sieve"),
     Auth("managesieve", False, "x", "192.0.2.7")),
    (stalwart("auth.failed", "Authentication failed", 'accountName = "x"', listener="weird"),
     Auth("other", False, "x", "192.0.2.7")),
    (stalwart("auth.failed", "Authentication failed"), Auth("imap", False, "", "192.0.2.7")),
    # Stalwart does not escape '"': a fake remoteIp inside the account name is not taken
    # (the name is cut at its '", ': the failure still counts against the client's address)
    (stalwart("auth.failed", "Authentication failed", 'accountName = "a", remoteIp = '
              '192.0.2.66"'), Auth("imap", False, "a", "192.0.2.7")),
    (f'{SL} INFO Authentication failed (auth.failed) accountName = "a", remoteIp = '
     '192.0.2.66", remoteIp = 192.0.2.7', Auth("other", False, "a", "192.0.2.7")),
    (stalwart("delivery.delivered", "Message delivered", "hostname = \"mx.example.net\""),
     Delivery("sent")),
    (stalwart("delivery.failed", "Delivery failed"), Delivery("deferred")),
    (stalwart("delivery.dsn-perm-fail", "Permanent DSN failure"), Delivery("bounced")),
    (stalwart("smtp.mailbox-does-not-exist", "Mailbox does not exist"), Reject("5xx", "rcpt")),
    (stalwart("smtp.relay-not-allowed", "Relay not allowed"), Reject("5xx", "rcpt")),
    (stalwart("smtp.mail-from-unauthenticated", "Sender not authenticated"),
     Reject("5xx", "mail")),
    (stalwart("smtp.message-too-large", "Message too large"), Reject("5xx", "data")),
    (stalwart("smtp.too-many-recipients", "Too many recipients"), Reject("4xx", "rcpt")),
    (stalwart("smtp.rate-limit-exceeded", "Rate limit exceeded"), Reject("4xx", "other")),
    (stalwart("smtp.concurrency-limit-exceeded", "Too many connections"),
     Reject("4xx", "connect")),
    (stalwart("tls.handshake-error", "TLS handshake error", listener="imaptls"),
     TlsFailure("imap")),
    (stalwart("delivery.start-tls-error", "STARTTLS error"), TlsFailure("smtp_client")),
    (f"{SL} WARN Implicit TLS error (delivery.implicit-tls-error)", TlsFailure("smtp_client")),
])
def test_stalwart_events(line, expected):
    assert parse_stalwart(line) == expected


@pytest.mark.parametrize("line", [
    stalwart("smtp.connection-start", "SMTP connection started"),
    stalwart("store.data-write", "Write data", level="DEBUG"),
    f"{SL} INFO Starting Stalwart Mail Server v0.10.7 (server.startup) version = \"0.10.7\"",
    f"{SL} INFO Server shutdown (server.shutdown)",
    "",
])
def test_stalwart_lines_it_ignores(line):
    assert parse_stalwart(line) is None


@pytest.mark.parametrize("line", [
    f"{SL} INFO something without an event name",
    "garbage",
    stalwart("auth.failed", "Authentication failed", ip="not-an-ip"),
    f'{SL} INFO Authentication failed (auth.failed) accountName = "john"',  # no remoteIp
    f"{SL} INFO Odd (noname) key = 1",
    "\x1b[37m2026-11-25T10:49:25Z\x1b[0m \x1b[32;1mINFO\x1b[0m Authentication failed "
    "(auth.failed) remoteIp = 192.0.2.7",  # ANSI colours: configure ansi = false
    "\tremoteIp = 192.0.2.7",  # multiline mode: configure multiline = false
])
def test_malformed_stalwart_lines_are_unparsed(line):
    assert parse_stalwart(line) is UNPARSED


# --------------------------------------------------------------------------- properties

# Text a log might hold: printable, control characters, the parsers' own markers.
MARKERS = st.sampled_from([
    ": ", "[", "]", "(", ")", "<", ">", ", ", "=", "/", "-login: ", "Login: ", "rip=",
    "(auth failed, ", " attempts", "status=", ", status=", "reject: ", "milter-reject: ",
    "client=", ", sasl_username=", "warning: ", "]: SASL ", " authentication failed",
    "disconnect from ", " auth=", "SSL_accept error from ", "postfix/smtpd[1]", "dovecot: ",
    "remoteIp = ", 'accountName = "', "(auth.failed) ", "2026", "\"", "\\", "1.2.3.4",
    "::1", "999", "²", "\x00", "\ufffd"])
LINES = st.lists(st.one_of(MARKERS, st.text(max_size=12)), max_size=24).map("".join)


@settings(max_examples=400, deadline=None)
@given(LINES, st.sampled_from(sorted(PARSERS)))
def test_parsers_never_raise_and_return_an_event_none_or_unparsed(line, fmt):
    event = PARSERS[fmt](line)
    assert event is None or isinstance(event, (Delivery, Reject, Auth, TlsFailure,
                                               SessionEnd, type(UNPARSED)))
    if isinstance(event, Auth):
        assert event.remote_ip and 0 <= event.attempts <= MAX_ATTEMPTS_PER_LINE
    if isinstance(event, Reject):
        assert event.cls in ("4xx", "5xx")


@settings(max_examples=200, deadline=None)
@given(LINES)
def test_client_text_after_a_postfix_or_dovecot_prefix_is_never_an_auth(text):
    for line in (f"{PF}/smtpd[20521]: improper command pipelining after CONNECT from "
                 f"localhost[127.0.0.1]: {text}",
                 f"{PF}/smtpd[20521]: warning: non-SMTP command from localhost[127.0.0.1]: "
                 f"{text}"):
        assert not isinstance(parse_postfix(line), Auth | Reject | Delivery)
    line = (f"{DC} imap-login: Info: Disconnected: Aborted login (no auth attempts in 0 secs):"
            f" user=<{text}>, rip=203.0.113.9, lip=192.0.2.1")
    assert not isinstance(parse_dovecot(line), Auth)
    for line in (f"{DC} lmtp(alice@example.test)<1><AbCd>: Info: msgid=<{text}>: saved mail "
                 "to INBOX",
                 f"{DC} auth: Info: plain(?,127.0.0.1,<AbCd>): Username character disallowed "
                 f"by auth_username_chars: 0x22 (username: {text})"):
        assert not isinstance(parse_dovecot(line), Auth)
        assert not isinstance(parse_maillog(line), Auth)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.sampled_from(sorted(PARSERS)))
def test_arbitrary_bytes_in_a_file_never_break_ingestion(data, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mail.log"
        path.write_bytes(data)
        source = LogSource("fuzz", path, fmt, tmp, start_at="beginning", batch_bytes=512)
        try:
            read = 0
            while True:
                batch = source.step()
                read += batch.lines
                if not batch.more:
                    break
        finally:
            source.close()
        lines = source.lines
        complete = data.count(b"\n")
        assert lines["parsed"] + lines["ignored"] + lines["unparsed"] == read <= complete
        assert source.errors == {"read": 0, "state": 0, "report": 0}
        assert render_text(LogIngestion([source]).collect())


# --------------------------------------------------------------------------- counting


def ingest(fmt: str, lines: list[str]) -> tuple[LogSource, list[Auth]]:
    source = LogSource("t", "/nonexistent/mail.log", fmt)
    return source, source.ingest(lines)


def test_one_dovecot_login_failure_is_counted_once():
    """The auth process's Password mismatch lines repeat what the login process reports."""
    source, auths = ingest("dovecot", [
        f"{DC} auth: Info: passwd-file(alice@example.test,127.0.0.1,<m1W>): Password mismatch",
        f"{DC} auth: Info: passwd-file(alice@example.test,127.0.0.1,<m1W>): Password mismatch",
        f"{DC} imap-login: Info: Disconnected (auth failed, 2 attempts in 4 secs): "
        "user=<alice@example.test>, method=PLAIN, rip=127.0.0.1, lip=127.0.0.1, session=<m1W>",
        f"{DC} {LOGIN}",
    ])
    assert source.auth == {("imap", "failure"): 2, ("imap", "success"): 1}
    assert [(a.success, a.attempts) for a in auths] == [(False, 2), (True, 1)]
    assert source.lines == {"parsed": 2, "ignored": 2, "unparsed": 0}


def submission_session(pid: int, messages: int, ip: str = "192.0.2.7") -> list[str]:
    tag = f"{PF}/submission/smtpd[{pid}]"
    lines = [f"{tag}: connect from unknown[{ip}]"]
    for n in range(messages):
        lines.append(f"{tag}: {pid:05X}{n:05X}: client=unknown[{ip}], sasl_method=PLAIN, "
                     "sasl_username=alice@example.test")
    auth = 1
    lines.append(f"{tag}: disconnect from unknown[{ip}] ehlo=2 starttls=1 auth={auth} "
                 f"mail={messages} rcpt={messages} data={messages} quit=1 commands=9")
    return lines


def test_one_smtp_auth_is_counted_once_however_many_messages_follow():
    lines = submission_session(100, 3) + submission_session(100, 1) + submission_session(
        101, 0)
    source, auths = ingest("postfix", lines)
    # three sessions authenticated (one sent nothing, yet it logged in)
    assert source.auth == {("submission", "success"): 3}
    # the engine hears of each session that named its login once
    assert [(a.login, a.success) for a in auths] == [("alice@example.test", True)] * 2


def test_smtp_auth_failure_counted_from_the_warning_only():
    tag = f"{PF}/submission/smtpd[200]"
    source, auths = ingest("postfix", [
        f"{tag}: connect from unknown[203.0.113.9]",
        f"{tag}: warning: unknown[203.0.113.9]: SASL PLAIN authentication failed: (reason "
        "unavailable), sasl_username=admin",
        f"{tag}: warning: unknown[203.0.113.9]: SASL LOGIN authentication failed: "
        "UGFzc3dvcmQ6",
        f"{tag}: disconnect from unknown[203.0.113.9] ehlo=1 auth=0/2 commands=1/3",
    ])
    assert source.auth == {("submission", "failure"): 2}
    assert [(a.login, a.remote_ip) for a in auths] == [("admin", "203.0.113.9"),
                                                       ("", "203.0.113.9")]


def test_sessions_remembered_are_bounded():
    from exporter.collectors import logs
    source, _ = ingest("postfix", [])
    for pid in range(logs.MAX_OPEN_SESSIONS + 50):  # disconnect lines lost
        source.ingest([f"{PF}/submission/smtpd[{pid}]: {pid:010X}: client=unknown[192.0.2.7]"
                       ", sasl_method=PLAIN, sasl_username=a"])
    assert len(source._sessions) == logs.MAX_OPEN_SESSIONS


def test_events_and_line_results_are_counted():
    lines = [line for line, _ in DELIVERIES] + [line for line, _, _ in REJECTS] + \
        POSTFIX_IGNORED + ["junk without separator"]
    source, _ = ingest("postfix", lines)
    assert source.lines == {"parsed": len(DELIVERIES) + len(REJECTS),
                            "ignored": len(POSTFIX_IGNORED), "unparsed": 1}
    assert source.events[Delivery("sent")] == 4
    assert source.events[Reject("5xx", "rcpt")] == 2


def test_a_parser_bug_costs_one_line_not_the_batch(monkeypatch):
    source, _ = ingest("postfix", [])

    def broken(line: str):
        if "boom" in line:
            raise RuntimeError("parser bug")
        return parse_postfix(line)

    source.parse = broken
    source.ingest(["boom", DELIVERIES[0][0]])
    assert source.lines == {"parsed": 1, "ignored": 0, "unparsed": 1}


# --------------------------------------------------------------------------- the rendered text

SECRET_VALUES = ["alice@example.test", "admin@example.test", "bob", "203.0.113.9", "127.0.0.1",
                 "2001:db8::7", "192.0.2.7", "nobody@example.test", "john"]


def test_rendered_metrics_carry_no_user_names_addresses_or_ips():
    tag = f"{PF}/submission/smtpd[300]"
    postfix = LogSource("postfix", "/nonexistent/a", "postfix")
    postfix.ingest([line for line, _ in DELIVERIES] + [line for line, _, _ in REJECTS] + [
        f"{tag}: warning: unknown[203.0.113.9]: SASL PLAIN authentication failed: (reason "
        "unavailable), sasl_username=admin@example.test",
        f"{tag}: 00000ABCDE: client=unknown[192.0.2.7], sasl_method=PLAIN, sasl_username=bob",
        f"{tag}: disconnect from unknown[192.0.2.7] ehlo=1 auth=1 commands=2",
        f"{tag}: SSL_accept error from unknown[203.0.113.9]: -1"])
    dovecot = LogSource("dovecot", "/nonexistent/b", "dovecot")
    dovecot.ingest([f"{DC} {LOGIN}", "Dec  1 07:54:40 mx dovecot: imap-login: Login: "
                    "user=<bob>, method=PLAIN, rip=2001:db8::7, lip=::1, mpid=1, session=<a>"])
    stalwart_source = LogSource("stalwart", "/nonexistent/c", "stalwart")
    stalwart_source.ingest([stalwart("auth.failed", "Authentication failed",
                                     'accountName = "john"', listener="weird-listener")])
    text = render_text(LogIngestion([postfix, dovecot, stalwart_source]).collect()).decode()
    for value in SECRET_VALUES:
        assert value not in text
    allowed = {
        "source": {"postfix", "dovecot", "stalwart"},
        "result": {"parsed", "ignored", "unparsed", "success", "failure"},
        "status": {"sent", "deferred", "bounced", "expired"},
        "class": {"4xx", "5xx"},
        "stage": {"connect", "helo", "mail", "rcpt", "data", "end-of-message", "vrfy", "etrn",
                  "header", "body", "other"},
        "service": {"smtp", "submission", "submissions", "smtps", "imap", "pop3",
                    "managesieve", "lmtp", "http", "other", "smtp_client"},
        "operation": {"read", "state", "report"},
        "kind": {"rename", "truncate"},
    }
    from prometheus_client.parser import text_string_to_metric_families
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, value in sample.labels.items():
                seen.setdefault(key, set()).add(value)
    for key, values in seen.items():
        assert values <= allowed[key], (key, values - allowed[key])
    assert ('a3mailer_auth_events_total{source="postfix",service="submission",'
            'result="success"} 1.0') in text
    assert ('a3mailer_auth_events_total{source="stalwart",service="other",'
            'result="failure"} 1.0') in text
    assert 'a3mailer_mail_deliveries_total{source="postfix",status="expired"} 1.0' in text
    assert 'a3mailer_mail_deliveries_total{source="dovecot"' not in text  # none from Dovecot


# --------------------------------------------------------------------------- following


class Writer:
    """Appends to a log file the way a daemon does (O_APPEND, reopened on request)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def write(self, data: bytes) -> None:
        self.fh.write(data)

    def lines(self, *lines: str) -> None:
        self.write("".join(f"{line}\n" for line in lines).encode())

    def reopen(self) -> None:
        self.fh.close()
        self.fh = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def close(self) -> None:
        self.fh.close()


def drain(follower: LogFollower) -> list[str]:
    out: list[str] = []
    while True:
        lines, more = follower.read_batch()
        out += lines
        follower.save()
        if not more:
            return out


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "mail.log"


@pytest.fixture
def writer(log_path):
    w = Writer(log_path)
    yield w
    w.close()


def follower_for(log_path: Path, state: Path | None = None, **kw) -> LogFollower:
    return LogFollower(log_path, state, **{"start_at": "beginning", **kw})


def test_partial_last_line_is_read_once_complete(log_path, writer):
    follower = follower_for(log_path)
    writer.write(b"one\ntw")
    assert drain(follower) == ["one"]
    assert drain(follower) == []
    writer.write(b"o\nthree\n")
    assert drain(follower) == ["two", "three"]


def test_start_at_end_skips_history_and_a_half_written_line(log_path, writer):
    writer.write(b"old 1\nold 2\nhalf of a li")
    follower = LogFollower(log_path, None, start_at="end")
    assert drain(follower) == []
    writer.write(b"ne\nnew\n")
    assert drain(follower) == ["new"]


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path):
    path = tmp_path / "later.log"
    follower = LogFollower(path, None, start_at="end")
    with pytest.raises(FileNotFoundError):
        follower.read_batch()
    path.write_bytes(b"first\nsecond\n")
    assert drain(follower) == ["first", "second"]


def test_rename_rotation_finishes_the_old_file_first(log_path, writer):
    follower = follower_for(log_path)
    writer.lines("a1", "a2")
    assert drain(follower) == ["a1", "a2"]
    writer.lines("a3")  # written before the rotation, never read yet
    os.rename(log_path, log_path.with_name("mail.log.1"))
    writer.lines("a4")  # the writer still has the old file open
    log_path.touch()  # logrotate's `create`: the new file exists, empty
    writer.lines("a5")  # ...and the writer has not been told to reopen yet
    assert drain(follower) == ["a3", "a4", "a5"]
    writer.write(b"a6 without newline")
    writer.reopen()  # postrotate: the writer moves on
    writer.lines("b1", "b2")
    assert drain(follower) == ["a6 without newline", "b1", "b2"]
    assert follower.rotations == {"rename": 1, "truncate": 0}
    writer.lines("b3")
    assert drain(follower) == ["b3"]


def test_rename_with_no_new_file_yet_keeps_reading_the_old(log_path, writer):
    follower = follower_for(log_path)
    writer.lines("a1")
    assert drain(follower) == ["a1"]
    os.rename(log_path, log_path.with_name("mail.log.1"))
    writer.lines("a2")
    assert drain(follower) == ["a2"]
    writer.reopen()  # creates the new file
    writer.lines("b1")
    assert drain(follower) == ["b1"]


def test_copytruncate_and_in_place_replacement_start_again(log_path, writer):
    follower = follower_for(log_path)
    writer.lines("a1 a long first line", "a2")
    assert drain(follower) == ["a1 a long first line", "a2"]
    os.truncate(log_path, 0)  # copytruncate
    writer.lines("b1")
    assert drain(follower) == ["b1"]
    assert follower.rotations["truncate"] == 1
    # rewritten in place, grown past the old offset before we looked: the fingerprint says
    with open(log_path, "r+b") as fh:
        fh.truncate(0)
        fh.write(b"c1 replaced content\nc2\nc3 and more than before\n")
    assert drain(follower) == ["c1 replaced content", "c2", "c3 and more than before"]
    assert follower.rotations["truncate"] == 2


def test_replacement_by_another_file_finishes_the_old_one(log_path, writer, tmp_path):
    follower = follower_for(log_path)
    writer.lines("a1")
    assert drain(follower) == ["a1"]
    writer.lines("a2")
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"n1\nn2\n")
    os.replace(fresh, log_path)  # the old file is unlinked, its fd still readable
    assert drain(follower) == ["a2", "n1", "n2"]
    assert follower.rotations["rename"] == 1


def test_restart_resumes_at_the_saved_offset(log_path, writer, tmp_path):
    state = tmp_path / "state.json"
    follower = follower_for(log_path, state, batch_bytes=16)
    writer.lines(*(f"line {n}" for n in range(10)))
    lines, _ = follower.read_batch()
    follower.save()
    follower.close()  # "crash" after one batch
    assert lines == ["line 0", "line 1"]
    writer.lines("line 10")
    resumed = follower_for(log_path, state, batch_bytes=16)
    assert drain(resumed) == [f"line {n}" for n in range(2, 11)]
    saved = json.loads(state.read_text())
    assert saved["offset"] == log_path.stat().st_size and saved["path"] == str(log_path)


def test_restart_after_a_rotation_finishes_the_rotated_file(log_path, writer, tmp_path):
    state = tmp_path / "state.json"
    follower = follower_for(log_path, state)
    writer.lines("a1")
    assert drain(follower) == ["a1"]
    follower.close()  # stopped
    writer.lines("a2")
    os.rename(log_path, log_path.with_name("mail.log.1"))
    writer.reopen()
    writer.lines("b1")
    resumed = follower_for(log_path, state)
    first, _ = resumed.read_batch()
    resumed.save()
    assert first == ["a2"]
    # a crash while the old file is being finished resumes it: the state names it
    assert json.loads(state.read_text())["inode"] == log_path.with_name(
        "mail.log.1").stat().st_ino
    resumed.close()
    again = follower_for(log_path, state)
    assert drain(again) == ["b1"]
    assert again.rotations["rename"] == 1


def test_restart_after_truncation_reads_from_the_start(log_path, writer, tmp_path):
    state = tmp_path / "state.json"
    follower = follower_for(log_path, state)
    writer.lines("a1 with some length", "a2")
    drain(follower)
    follower.close()
    os.truncate(log_path, 0)
    writer.lines("b1")
    resumed = follower_for(log_path, state)
    assert drain(resumed) == ["b1"]
    assert resumed.rotations["truncate"] == 1


def test_state_of_another_path_or_unreadable_state_is_not_used(log_path, writer, tmp_path):
    state = tmp_path / "state.json"
    writer.lines("old")
    state.write_text(json.dumps({"version": 1, "path": "/var/log/other.log", "inode": 1,
                                 "offset": 3, "fingerprint": "", "fingerprint_bytes": 0}))
    assert drain(LogFollower(log_path, state, start_at="end")) == []  # its start_at applies
    state.write_text("{not json")
    assert drain(LogFollower(log_path, state, start_at="beginning")) == ["old"]
    state.write_text(json.dumps({"version": 1, "path": str(log_path), "inode": "x"}))
    assert drain(LogFollower(log_path, state, start_at="end")) == ["old"]


@pytest.mark.parametrize("bad", [{"offset": -5}, {"skipping": "false"}, {"offset": True},
                                 {"fingerprint_bytes": 10**9}, {"inode": -1},
                                 {"fingerprint": 7}])
def test_state_with_a_bad_value_is_not_used(log_path, writer, tmp_path, caplog, bad):
    """A corrupted or hand-edited value (a negative offset gave EINVAL on every poll,
    "false" read as True dropped a line): the file is read from its start, once warned."""
    state = tmp_path / "state.json"
    writer.lines("one", "two")
    follower = follower_for(log_path, state)
    assert drain(follower) == ["one", "two"]
    follower.close()
    saved = json.loads(state.read_text())
    saved.update({"offset": 0, "skipping": False, **bad})
    state.write_text(json.dumps(saved))
    source = LogSource("t", log_path, "postfix", None)
    source.follower = follower_for(log_path, state, start_at="end")
    assert source.step().lines == 2 and source.errors["read"] == 0
    assert source.step().lines == 0 and source.errors["read"] == 0
    warned = [r for r in caplog.records if r.message.startswith("log follower state unusable")]
    assert len(warned) == 1 and list(bad)[0] in warned[0].error


def test_overlong_line_is_counted_once_and_dropped(log_path, writer):
    assert len(DELIVERIES[0][0]) < 256
    source = LogSource("t", log_path, "postfix", None, start_at="beginning", batch_bytes=256)
    writer.write(b"x" * 600 + b"\n" + DELIVERIES[0][0].encode()[:50] + b"\n")
    writer.lines("y" * 10)
    while source.step().more:
        pass
    # the overlong line and "yyy..." are unparsed; the cut delivery line says nothing
    assert source.lines["unparsed"] == 2 and source.lines["ignored"] == 1
    assert source.follower.overlong_lines == 0  # handed over to the counters
    writer.write(b"z" * 300)  # an overlong line still being written
    source.step()
    writer.write(b"z" * 300 + b"\n")
    writer.lines(DELIVERIES[0][0])
    while source.step().more:
        pass
    assert source.lines["unparsed"] == 3
    assert source.events == {Delivery("sent"): 1}


def test_non_utf8_bytes_are_replaced_not_fatal(log_path, writer):
    source = LogSource("t", log_path, "dovecot", None, start_at="beginning")
    writer.write(b"Dec 01 07:54:40 imap-login: Info: Login: user=<\xff\xfeal\xc3>, "
                 b"method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, mpid=1, session=<a>\n"
                 b"\x00\x01\x02 binary junk \xff\n")
    auths = []
    while (batch := source.step()).lines:
        auths += batch.auths
    assert [a.login for a in auths] == ["\ufffd\ufffdal\ufffd"]
    assert source.lines == {"parsed": 1, "ignored": 0, "unparsed": 1}


def test_missing_file_and_unsaveable_state_are_counted_not_raised(tmp_path, caplog):
    source = LogSource("t", tmp_path / "absent.log", "postfix", None)
    assert source.step().lines == 0 and source.step().lines == 0
    assert source.errors["read"] == 2
    assert len([r for r in caplog.records if "log ingestion problem" in r.message]) == 1
    (tmp_path / "present.log").write_text("x\n")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the state dir should be")
    source = LogSource("t", tmp_path / "present.log", "postfix", blocker,
                       start_at="beginning")
    assert source.step().lines == 1
    assert source.errors["state"] == 1


async def test_a_fifo_or_directory_is_refused_and_blocks_nothing(tmp_path):
    """Opening a FIFO without a writer blocks; no source may hold up the others or stop()."""
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    (tmp_path / "dir.log").mkdir()
    good = tmp_path / "mail.log"
    good.write_text(f"{DC} {LOGIN}\n")
    files = [{"name": name, "path": str(tmp_path / f"{name}.log"), "format": "dovecot",
              "start_at": "beginning"} for name in ("fifo", "dir", "mail")]
    ingestion = LogIngestion.from_config({"files": files}, tmp_path / "state")
    try:
        assert await asyncio.wait_for(ingestion.poll_once(), 5) == 1
        fifo_source, dir_source, mail = ingestion.sources
        assert mail.auth == {("imap", "success"): 1}
        for source in (fifo_source, dir_source):
            assert source.errors["read"] == 1 and source.follower._fd is None
            assert "not a regular file" in source._last_error
        await asyncio.wait_for(ingestion.stop(), 5)
    finally:  # on a blocking open, a writer lets the worker thread go
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# A random mix of what writers, logrotate and restarts do; every complete line must be read
# exactly once and in order.
OPS = st.lists(st.sampled_from(["append", "append", "append", "partial", "poll", "poll",
                                "restart", "rename", "rename_create", "reopen", "truncate",
                                "replace", "rotate_while_down"]), min_size=1, max_size=40)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.integers(0, 2**32))
def test_every_line_read_exactly_once_in_order_across_rotations_and_restarts(ops, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = directory / "mail.log"
        written: list[bytes] = []
        partial = b""
        counter = 0
        rotated = 0
        on_path = True  # the writer writes to the file at the path (not a renamed one)
        outstanding = False  # renamed, and the follower may not have moved on yet
        fh = open(path, "ab", buffering=0)  # noqa: SIM115
        seen: list[str] = []

        def make_source() -> LogSource:
            source = LogSource("m", path, "postfix", directory / "state",
                               start_at="beginning", batch_bytes=rng.choice([64, 200, 4096]))
            source.parse = lambda line: seen.append(line)  # records; counts nothing
            return source

        def poll() -> None:
            while source.step().more:
                pass

        def new_line() -> bytes:
            nonlocal counter
            counter += 1
            junk = bytes(rng.choice(b"abc \xff\xc3") for _ in range(rng.randrange(20)))
            return b"line %d " % counter + junk

        source = make_source()
        try:
            poll()
            for op in ops:
                if op == "append":
                    for _ in range(rng.randrange(1, 6)):
                        rest = new_line()
                        fh.write(rest + b"\n")  # completes a partial line already there
                        written.append(partial + rest)
                        partial = b""
                elif op == "partial" and not partial:
                    partial = new_line()
                    fh.write(partial)
                elif op == "poll":
                    poll()
                elif op == "restart":
                    source.close()
                    source = make_source()
                    poll()  # (what happens while it is down: the tests above)
                elif op in ("rename", "rename_create") and on_path and path.exists() and (
                        path.stat().st_size > 0):
                    poll()  # one rotation outstanding at a time
                    rotated += 1
                    os.rename(path, directory / f"mail.log.{rotated}")
                    outstanding = True
                    on_path = False
                    if op == "rename_create":
                        path.touch()
                elif op == "reopen" and not on_path:
                    fh.close()
                    if partial:  # the writer moved on: its last line ends there
                        written.append(partial)
                        partial = b""
                    fh = open(path, "ab", buffering=0)  # noqa: SIM115
                    on_path = True
                elif op == "rotate_while_down" and on_path and not outstanding:
                    source.close()
                    rotated += 1
                    os.rename(path, directory / f"mail.log.{rotated}")
                    fh.close()
                    if partial:
                        written.append(partial)
                        partial = b""
                    fh = open(path, "ab", buffering=0)  # noqa: SIM115
                    lines = [new_line() for _ in range(rng.randrange(0, 3))]
                    fh.write(b"".join(line + b"\n" for line in lines))
                    written += lines
                    source = make_source()
                    poll()
                    outstanding = not lines  # on the old file until the new one has data
                elif op == "truncate" and on_path and not partial:
                    poll()  # copytruncate loses what was not read yet
                    os.truncate(path, 0)
                elif op == "replace" and on_path and not (
                        outstanding and path.stat().st_size == 0):
                    if outstanding:  # one rotation outstanding at a time
                        poll()
                        outstanding = False
                    fresh = directory / "fresh"
                    lines = [new_line() for _ in range(rng.randrange(1, 4))]
                    fresh.write_bytes(b"".join(line + b"\n" for line in lines))
                    fh.close()
                    os.replace(fresh, path)
                    if partial:
                        written.append(partial)
                        partial = b""
                    written += lines
                    fh = open(path, "ab", buffering=0)  # noqa: SIM115
                    poll()  # the old file is unlinked: a restart now would lose its rest
            if not on_path:
                fh.close()
                if partial:
                    written.append(partial)
                    partial = b""
                fh = open(path, "ab", buffering=0)  # noqa: SIM115
            last = new_line()
            fh.write(last + b"\n")
            written.append(partial + last)
            poll()
            poll()
        finally:
            source.close()
            fh.close()
        assert seen == [line.decode("utf-8", "replace") for line in written]


# --------------------------------------------------------------------------- the engine


class Sink:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple[str, str, str, bool]] = []
        self.fail = fail

    async def __call__(self, login: str, ip: str, protocol: str, success: bool) -> None:
        if self.fail:
            raise RuntimeError("engine down")
        self.calls.append((login, ip, protocol, success))


MIXED = [
    f"{DC} imap-login: Info: Disconnected (auth failed, 3 attempts in 9 secs): user=<eve>, "
    "method=PLAIN, rip=203.0.113.9, lip=192.0.2.1, session=<a>",
    f"{PF}/submission/smtpd[7]: warning: unknown[203.0.113.9]: SASL PLAIN authentication "
    "failed: (reason unavailable), sasl_username=eve",
    f"{DC} {LOGIN}",
]


async def test_poll_reports_each_attempt_to_the_engine(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text("\n".join(MIXED) + "\n")
    sink = Sink()
    ingestion = LogIngestion.from_config(
        {"poll_interval": "1s", "files": [{"name": "mail", "path": str(path),
                                           "format": "maillog", "start_at": "beginning"}]},
        tmp_path / "state", on_auth=sink)
    assert await ingestion.poll_once() == 3
    assert sink.calls == [("eve", "203.0.113.9", "imap", False)] * 3 + [
        ("eve", "203.0.113.9", "submission", False),
        ("alice@example.test", "127.0.0.1", "imap", True)]
    assert (tmp_path / "state" / "logs" / "mail.json").exists()
    await ingestion.stop()


@pytest.mark.parametrize("section, per_file", [({"feed_security": False}, True),
                                               ({}, False)])
async def test_feed_security_off_reports_nothing(tmp_path, section, per_file):
    path = tmp_path / "mail.log"
    path.write_text("\n".join(MIXED) + "\n")
    sink = Sink()
    item = {"name": "mail", "path": str(path), "format": "maillog", "start_at": "beginning",
            "feed_security": per_file}
    ingestion = LogIngestion.from_config({**section, "files": [item]}, tmp_path, on_auth=sink)
    await ingestion.poll_once()
    assert sink.calls == []
    assert ingestion.sources[0].auth[("imap", "failure")] == 3  # still counted
    await ingestion.stop()


async def test_engine_errors_are_counted_and_the_offset_kept(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text(MIXED[0] + "\n")
    ingestion = LogIngestion.from_config(
        {"files": [{"name": "mail", "path": str(path), "format": "maillog",
                    "start_at": "beginning"}]}, tmp_path, on_auth=Sink(fail=True))
    await ingestion.poll_once()
    source = ingestion.sources[0]
    assert source.errors["report"] == 3
    assert source.follower.offset == path.stat().st_size  # at most once: not re-read
    await ingestion.stop()


async def test_the_loop_polls_until_stopped_and_reload_keeps_counters(tmp_path):
    path = tmp_path / "mail.log"
    path.write_text("")
    section = {"poll_interval": "50ms", "files": [{"name": "mail", "path": str(path),
                                                   "format": "dovecot",
                                                   "start_at": "beginning"}]}
    ingestion = LogIngestion.from_config(section, tmp_path)
    await ingestion.start()
    try:
        with path.open("a") as fh:
            fh.write(f"{DC} {LOGIN}\n")
        for _ in range(100):
            if ingestion.sources[0].auth:
                break
            await asyncio.sleep(0.02)
        source = ingestion.sources[0]
        assert source.auth == {("imap", "success"): 1}
        ingestion.configure({**section, "feed_security": False}, tmp_path)
        assert ingestion.sources[0] is source and not ingestion.feed_security
        ingestion.configure({"files": [{**section["files"][0], "format": "maillog"}]}, tmp_path)
        assert ingestion.sources[0] is not source  # another format: counted afresh
        assert source.follower._fd is None  # the replaced one was closed
    finally:
        await ingestion.stop()
    assert ingestion._task is None


async def test_a_source_a_reload_drops_during_a_poll_is_not_reopened(tmp_path):
    """poll_once walks the sources it listed; one that configure() closed meanwhile must
    stay closed (reopening it leaked its descriptor) and read nothing."""
    files = []
    for name in ("first", "dropped"):
        path = tmp_path / f"{name}.log"
        path.write_text(MIXED[0] + "\n")
        files.append({"name": name, "path": str(path), "format": "maillog",
                      "start_at": "beginning"})

    async def reload_on_first_report(login: str, ip: str, protocol: str, success: bool):
        if len(ingestion.sources) == 2:  # while the poll is at the first source
            ingestion.configure({"files": files[:1]}, tmp_path)

    ingestion = LogIngestion.from_config({"files": files}, tmp_path,
                                         on_auth=reload_on_first_report)
    dropped = ingestion.sources[1]
    assert await ingestion.poll_once() == 1
    assert dropped.follower._fd is None and dropped.lines["parsed"] == 0
    assert dropped.step() == ([], 0, False) and dropped.follower._fd is None
    await ingestion.stop()
    # stop() closes the kept source too; start() again reads on
    first = ingestion.sources[0]
    with open(files[0]["path"], "a") as fh:
        fh.write(f"{DC} {LOGIN}\n")
    await ingestion.start()
    try:
        for _ in range(100):
            if first.auth.get(("imap", "success")):
                break
            await asyncio.sleep(0.02)
        assert first.auth[("imap", "success")] == 1
    finally:
        await ingestion.stop()

