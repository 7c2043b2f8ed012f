"""Benchmark "logs": lines per second of our log parser against fail2ban-regex on one file.

A realistic mixed Postfix + Dovecot syslog mail log (what Debian writes to
/var/log/mail.log: inbound deliveries with their Dovecot LMTP lines, authenticated
submissions, deferrals, bounces, expiries, spam and relay rejections, SMTP AUTH
brute force, IMAP and POP3 logins good and bad, TLS handshake failures, and the usual
noise) is generated once into a temp file: 1M lines (50k with --quick).

Candidate: the exporter's whole ingestion path for one configured file of format
`maillog`, in this process: LogFollower reading 1 MiB batches, decoding and splitting
them, parse_maillog on every line, and LogSource counting every event (the security
engine is left out: it gets only the auth events). Its counts are checked against the
generator's before any figure is trusted.

Baseline: Debian's fail2ban 1.0.2, `fail2ban-regex --print-no-missed --usedns=no <file>
/etc/fail2ban/filter.d/dovecot.conf` and the same with `postfix.conf` (the filters as
shipped: dovecot's normal mode, postfix's default "more" mode, which leaves SMTP AUTH
failures out), each a child process over the same file. Getting both kinds of events
out of the file takes both runs, so fail2ban's rate is lines / (dovecot time + postfix
time); the per-filter rates are reported too. Its time is taken two ways: the wall time
of the child (interpreter start and filter loading included) and the time fail2ban
prints itself ("processed in X sec", the file alone); the target uses the latter, the
stricter one for us. Candidate and baseline runs alternate within every round.

Run: .venv/bin/python benchmarks/bench_logs.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import ratio, say, summary, write_result

from exporter.collectors.logs import Delivery, LogSource, Reject, TlsFailure

TARGET_RATIO = 10.0
FILTERS = {"dovecot": "/etc/fail2ban/filter.d/dovecot.conf",
           "postfix": "/etc/fail2ban/filter.d/postfix.conf"}
FAIL2BAN = shutil.which("fail2ban-regex") or "/usr/bin/fail2ban-regex"


@dataclass
class Mode:
    lines: int
    rounds: int


FULL = Mode(lines=1_000_000, rounds=5)
QUICK = Mode(lines=50_000, rounds=2)


# --- the generated log ------------------------------------------------------------------

MONTH_DAY = "Nov 25"
HOST = "mail"
USERS = [f"user{i}@example.org" for i in range(2_000)]
REMOTE_DOMAINS = ["gmail.com", "example.net", "outlook.com", "web.de", "mail.ru"]


class Log:
    """Writes syslog lines and counts the events they hold, as the parser should."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.out: list[str] = []
        self.clock = 0.0
        self.expected: Counter[str] = Counter()
        self.pid = 4000

    def ts(self) -> str:
        self.clock += self.rng.expovariate(20.0)
        seconds = int(self.clock) % 86400
        return f"{MONTH_DAY} {seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def postfix(self, daemon: str, pid: int, text: str) -> None:
        self.out.append(f"{self.ts()} {HOST} postfix/{daemon}[{pid}]: {text}")

    def dovecot(self, text: str) -> None:
        self.out.append(f"{self.ts()} {HOST} dovecot: {text}")

    def ip(self) -> str:
        r = self.rng
        if r.random() < 0.08:
            return f"2001:db8:{r.randrange(65536):x}::{r.randrange(1, 65536):x}"
        return f"{r.choice((203, 198, 192, 185, 45))}.{r.randrange(256)}.{r.randrange(256)}." \
               f"{r.randrange(1, 255)}"

    def qid(self) -> str:
        return "".join(self.rng.choice("0123456789ABCDEF") for _ in range(11))

    def session(self) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        return "".join(self.rng.choice(alphabet) for _ in range(16))

    def next_pid(self) -> int:
        self.pid = self.pid + self.rng.randrange(1, 40)
        if self.pid > 60000:
            self.pid = 4000
        return self.pid


def inbound(log: Log) -> None:
    r = log.rng
    ip, pid, qid = log.ip(), log.next_pid(), log.qid()
    host = f"mail-{r.randrange(999)}.{r.choice(REMOTE_DOMAINS)}"
    user = r.choice(USERS)
    log.postfix("smtpd", pid, f"connect from {host}[{ip}]")
    if r.random() < 0.6:
        log.postfix("smtpd", pid, f"Anonymous TLS connection established from {host}[{ip}]: "
                    "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange "
                    "X25519 server-signature ECDSA (prime256v1) server-digest SHA256")
    log.postfix("smtpd", pid, f"{qid}: client={host}[{ip}]")
    log.postfix("cleanup", pid + 3, f"{qid}: message-id=<{log.session()}@{host}>")
    log.postfix("qmgr", 1201, f"{qid}: from=<news@{host}>, size={r.randrange(900, 90000)}, "
                "nrcpt=1 (queue active)")
    lmtp = log.next_pid()
    log.dovecot(f"lmtp({lmtp}): Connect from 127.0.0.1")
    if r.random() < 0.04:
        log.postfix("lmtp", pid + 5, f"{qid}: to=<{user}>, relay=127.0.0.1[127.0.0.1]:24, "
                    "delay=0.31, delays=0.2/0/0/0.1, dsn=4.2.2, status=deferred (host "
                    f"127.0.0.1[127.0.0.1] said: 452 4.2.2 <{user}> Mailbox is full (in reply "
                    "to end of DATA command))")
        log.expected["delivery deferred"] += 1
    else:
        log.dovecot(f"lmtp({user})<{lmtp}><{log.session()}>: msgid=<{log.session()}@{host}>: "
                    "saved mail to INBOX")
        log.postfix("lmtp", pid + 5, f"{qid}: to=<{user}>, relay=127.0.0.1[127.0.0.1]:24, "
                    f"delay=0.12, delays=0.05/0.01/0.02/0.04, dsn=2.0.0, status=sent (250 2.0.0 "
                    f"<{user}> {log.session()} Saved)")
        log.expected["delivery sent"] += 1
        log.postfix("qmgr", 1201, f"{qid}: removed")
    log.dovecot(f"lmtp({lmtp}): Disconnect from 127.0.0.1: Logged out (state=READY)")
    log.postfix("smtpd", pid, f"disconnect from {host}[{ip}] ehlo=1 mail=1 rcpt=1 data=1 "
                "quit=1 commands=5")


def submission(log: Log) -> None:
    r = log.rng
    ip, pid, user = log.ip(), log.next_pid(), r.choice(USERS)
    log.postfix("submission/smtpd", pid, f"connect from unknown[{ip}]")
    log.postfix("submission/smtpd", pid, f"Anonymous TLS connection established from "
                f"unknown[{ip}]: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    log.expected["auth submission success"] += 1
    for _ in range(2 if r.random() < 0.2 else 1):  # a second message: still one AUTH
        qid = log.qid()
        rcpt = f"someone{r.randrange(99)}@{r.choice(REMOTE_DOMAINS)}"
        log.postfix("submission/smtpd", pid, f"{qid}: client=unknown[{ip}], sasl_method=PLAIN, "
                    f"sasl_username={user}")
        log.postfix("cleanup", pid + 2, f"{qid}: message-id=<{log.session()}@example.org>")
        log.postfix("qmgr", 1201, f"{qid}: from=<{user}>, size={r.randrange(600, 40000)}, "
                    "nrcpt=1 (queue active)")
        outcome = r.random()
        mx = f"mx{r.randrange(4)}.{rcpt.split('@')[1]}[{log.ip()}]:25"
        if outcome < 0.8:
            log.postfix("smtp", pid + 7, f"{qid}: to=<{rcpt}>, relay={mx}, delay=1.2, "
                        "delays=0.01/0.01/0.5/0.7, dsn=2.0.0, status=sent (250 2.0.0 OK  "
                        f"1732532962 {log.session()} - gsmtp)")
            log.postfix("qmgr", 1201, f"{qid}: removed")
            log.expected["delivery sent"] += 1
        elif outcome < 0.95:
            log.postfix("smtp", pid + 7, f"{qid}: to=<{rcpt}>, relay=none, delay=30, "
                        f"delays=0.01/0/30/0, dsn=4.4.1, status=deferred (connect to {mx}: "
                        "Connection timed out)")
            log.expected["delivery deferred"] += 1
        else:
            log.postfix("smtp", pid + 7, f"{qid}: to=<{rcpt}>, relay={mx}, delay=0.9, "
                        "delays=0.01/0/0.4/0.5, dsn=5.1.1, status=bounced (host "
                        f"{mx.rsplit(':', 1)[0]} said: 550 5.1.1 <{rcpt}>: Recipient address "
                        "rejected: User unknown in virtual alias table (in reply to RCPT TO "
                        "command))")
            log.postfix("cleanup", pid + 2, f"{log.qid()}: message-id=<bounce@example.org>")
            log.postfix("bounce", pid + 9, f"{qid}: sender non-delivery notification: "
                        f"{log.qid()}")
            log.postfix("qmgr", 1201, f"{qid}: removed")
            log.expected["delivery bounced"] += 1
    log.postfix("submission/smtpd", pid, f"disconnect from unknown[{ip}] ehlo=2 starttls=1 "
                "auth=1 mail=1 rcpt=1 data=1 quit=1 commands=8")


def expired(log: Log) -> None:
    log.postfix("qmgr", 1201, f"{log.qid()}: from=<{log.rng.choice(USERS)}>, status=expired, "
                "returned to sender")
    log.expected["delivery expired"] += 1


REJECTS = [
    ("554 5.7.1 Service unavailable; Client host [{ip}] blocked using zen.spamhaus.org; "
     "https://www.spamhaus.org/query/ip/{ip}", "5xx"),
    ("550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown in virtual mailbox table",
     "5xx"),
    ("450 4.7.1 Client host rejected: cannot find your hostname, [{ip}]", "4xx"),
    ("454 4.7.1 <{rcpt}>: Relay access denied", "4xx"),
]


def spam_reject(log: Log) -> None:
    r = log.rng
    ip, pid = log.ip(), log.next_pid()
    text, cls = r.choice(REJECTS)
    rcpt = r.choice(USERS) if r.random() < 0.7 else f"x{r.randrange(99)}@elsewhere.test"
    log.postfix("smtpd", pid, f"connect from unknown[{ip}]")
    reply, dom = text.format(ip=ip, rcpt=rcpt), r.choice(REMOTE_DOMAINS)
    log.postfix("smtpd", pid, f"NOQUEUE: reject: RCPT from unknown[{ip}]: {reply}; "
                f"from=<spam@{dom}> to=<{rcpt}> proto=ESMTP helo=<[{ip}]>")
    log.expected[f"reject {cls} rcpt"] += 1
    log.postfix("smtpd", pid, f"disconnect from unknown[{ip}] ehlo=1 mail=1 rcpt=0/1 quit=1 "
                "commands=3/4")


def sasl_bruteforce(log: Log) -> None:
    r = log.rng
    ip, pid = log.ip(), log.next_pid()
    log.postfix("submission/smtpd", pid, f"connect from unknown[{ip}]")
    if r.random() < 0.5:
        log.postfix("submission/smtpd", pid, f"warning: unknown[{ip}]: SASL LOGIN "
                    "authentication failed: UGFzc3dvcmQ6")
    else:
        log.postfix("submission/smtpd", pid, f"warning: unknown[{ip}]: SASL PLAIN "
                    f"authentication failed: (reason unavailable), "
                    f"sasl_username={r.choice(USERS)}")
    log.expected["auth submission failure"] += 1
    log.postfix("submission/smtpd", pid, f"lost connection after AUTH from unknown[{ip}]")
    log.postfix("submission/smtpd", pid, f"disconnect from unknown[{ip}] ehlo=1 auth=0/1 "
                "commands=1/2")


def smtp_tls_failure(log: Log) -> None:
    ip, pid = log.ip(), log.next_pid()
    log.postfix("smtpd", pid, f"connect from unknown[{ip}]")
    log.postfix("smtpd", pid, f"SSL_accept error from unknown[{ip}]: -1")
    log.postfix("smtpd", pid, "warning: TLS library problem: error:0A000418:SSL routines::tlsv1 "
                "alert unknown ca:../ssl/record/rec_layer_s3.c:1601:SSL alert number 48:")
    log.expected["tls smtp"] += 1
    log.postfix("smtpd", pid, f"lost connection after STARTTLS from unknown[{ip}]")
    log.postfix("smtpd", pid, f"disconnect from unknown[{ip}] ehlo=1 starttls=0/1 commands=1/2")


def mailbox_login(log: Log) -> None:
    r = log.rng
    service = "imap" if r.random() < 0.8 else "pop3"
    user, ip, mpid, sess = r.choice(USERS), log.ip(), log.next_pid(), log.session()
    log.dovecot(f"{service}-login: Login: user=<{user}>, method=PLAIN, rip={ip}, "
                f"lip=192.0.2.10, mpid={mpid}, TLS, session=<{sess}>")
    log.expected[f"auth {service} success"] += 1
    if service == "imap":
        log.dovecot(f"imap({user})<{mpid}><{sess}>: Logged out in={r.randrange(99, 9999)} "
                    f"out={r.randrange(400, 99999)} deleted=0 expunged=0 trashed=0 "
                    "hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0")
    else:
        log.dovecot(f"pop3({user})<{mpid}><{sess}>: Disconnected: Logged out top=0/0, "
                    f"retr=1/{r.randrange(900, 9000)}, del=1/1, size={r.randrange(900, 9000)}")


def mailbox_failure(log: Log) -> None:
    r = log.rng
    service = "imap" if r.random() < 0.7 else "pop3"
    user = r.choice(USERS) if r.random() < 0.6 else f"admin{r.randrange(50)}@example.org"
    ip, sess, attempts = log.ip(), log.session(), r.choice((1, 1, 1, 2, 3))
    for _ in range(attempts):
        log.dovecot(f"auth: passwd-file({user},{ip},<{sess}>): Password mismatch")
    reason = r.choice(("Disconnected: Aborted login by logging out", "Disconnected",
                       "Disconnected: Connection closed"))
    log.dovecot(f"{service}-login: {reason} (auth failed, {attempts} attempts in "
                f"{2 * attempts} secs): user=<{user}>, method=PLAIN, rip={ip}, lip=192.0.2.10, "
                f"TLS, session=<{sess}>")
    log.expected[f"auth {service} failure"] += attempts


def dovecot_tls_failure(log: Log) -> None:
    r = log.rng
    service = "imap" if r.random() < 0.7 else "pop3"
    log.dovecot(f"{service}-login: Disconnected: Connection closed: SSL_accept() failed: "
                "error:0A00010B:SSL routines::wrong version number (no auth attempts in 0 secs): "
                f"user=<>, rip={log.ip()}, lip=192.0.2.10, TLS handshaking: SSL_accept() "
                f"failed: error:0A00010B:SSL routines::wrong version number, "
                f"session=<{log.session()}>")
    log.expected[f"tls {service}"] += 1


def noise(log: Log) -> None:
    r = log.rng
    choice = r.random()
    if choice < 0.4:
        log.dovecot(f"imap-login: Disconnected: Connection closed (no auth attempts in 0 "
                    f"secs): user=<>, rip={log.ip()}, lip=192.0.2.10, TLS, "
                    f"session=<{log.session()}>")
    elif choice < 0.7:
        log.postfix("anvil", 1300, f"statistics: max connection rate 3/60s for "
                    f"(smtp:{log.ip()}) at {MONTH_DAY} 10:49:25")
    else:
        ip, pid = log.ip(), log.next_pid()
        log.postfix("smtpd", pid, f"connect from unknown[{ip}]")
        log.postfix("smtpd", pid, f"lost connection after EHLO from unknown[{ip}]")
        log.postfix("smtpd", pid, f"disconnect from unknown[{ip}] ehlo=1 commands=1")


MIX = [(inbound, 30), (submission, 8), (expired, 1), (spam_reject, 15), (sasl_bruteforce, 10),
       (smtp_tls_failure, 2), (mailbox_login, 25), (mailbox_failure, 10),
       (dovecot_tls_failure, 2), (noise, 12)]


def generate(path: Path, lines: int, seed: int = 7) -> dict[str, Any]:
    """Writes whole sessions until at least `lines` lines; returns the events they hold."""
    log = Log(seed)
    kinds, weights = zip(*MIX, strict=True)
    written = 0
    with path.open("w", encoding="utf-8") as fh:
        while written < lines:
            log.out.clear()
            for kind in log.rng.choices(kinds, weights, k=100):
                kind(log)
                if written + len(log.out) >= lines:
                    break
            fh.write("\n".join(log.out) + "\n")
            written += len(log.out)
    return {"lines": written, "bytes": path.stat().st_size, "expected": dict(log.expected)}


# --- candidate and baseline -------------------------------------------------------------


def _source_counts(source: LogSource) -> dict[str, int]:
    """The source's counters under the generator's names ("delivery sent", ...)."""
    out: dict[str, int] = {}
    for event, value in source.events.items():
        if isinstance(event, Delivery):
            out[f"delivery {event.status}"] = value
        elif isinstance(event, Reject):
            out[f"reject {event.cls} {event.stage}"] = value
        elif isinstance(event, TlsFailure):
            out[f"tls {event.service}"] = value
    for (service, result), value in source.auth.items():
        out[f"auth {service} {result}"] = value
    return out


def run_ours(path: Path) -> tuple[float, dict[str, int], dict[str, int]]:
    """Seconds to follow, parse and count the whole file, with the counts."""
    gc.collect()
    source = LogSource("bench", path, "maillog", None, start_at="beginning")
    start = time.perf_counter()
    while source.step().more:
        pass
    elapsed = time.perf_counter() - start
    source.close()
    return elapsed, _source_counts(source), dict(source.lines)


_PROCESSED = re.compile(r"\[processed in ([0-9.]+) sec\]")
_LINES = re.compile(r"Lines: (\d+) lines, (\d+) ignored, (\d+) matched, (\d+) missed")


def run_fail2ban(path: Path, filter_path: str) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([FAIL2BAN, "--print-no-missed", "--usedns=no", str(path),
                           filter_path], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fail2ban-regex failed ({done.returncode}): {done.stderr[-2000:]}")
    processed, lines = _PROCESSED.search(done.stdout), _LINES.search(done.stdout)
    if processed is None or lines is None:
        raise RuntimeError(f"unexpected fail2ban-regex output: {done.stdout[-2000:]}")
    return {"wall_s": wall, "processed_s": float(processed.group(1)),
            "lines": int(lines.group(1)), "matched": int(lines.group(3)),
            "output_bytes": len(done.stdout)}


def fail2ban_version() -> str:
    done = subprocess.run([FAIL2BAN, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0]


# --- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="50k lines, 2 rounds: a smoke run")
    parser.add_argument("--out", type=Path, help="result file (default results/logs.json)")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL

    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        path = Path(tmp) / "mail.log"
        began = time.monotonic()
        generated = generate(path, mode.lines)
        say(f"generated {generated['lines']:,} lines, {generated['bytes'] / 2**20:.1f} MiB, "
            f"in {time.monotonic() - began:.1f} s")
        path.read_bytes()  # warm the page cache for everyone

        _, counts, line_results = run_ours(path)  # warm-up, and the correctness check
        if counts != generated["expected"]:
            diff = {k: (counts.get(k, 0), generated["expected"].get(k, 0))
                    for k in set(counts) | set(generated["expected"])
                    if counts.get(k, 0) != generated["expected"].get(k, 0)}
            raise SystemExit(f"parser counts differ from the generator's (got, expected): "
                             f"{diff}")
        say(f"our counts match the generator's: {sum(counts.values()):,} events in "
            f"{line_results['parsed']:,} parsed lines")

        ours: list[float] = []
        f2b: dict[str, dict[str, list[float]]] = {
            name: {"wall_s": [], "processed_s": []} for name in FILTERS}
        matched: dict[str, int] = {}
        for rnd in range(mode.rounds):
            steps = ["ours", *FILTERS]
            shift = rnd % len(steps)
            for step in steps[shift:] + steps[:shift]:
                if step == "ours":
                    seconds, _, _ = run_ours(path)
                    ours.append(seconds)
                    say(f"round {rnd + 1}: ours {seconds:.3f} s")
                else:
                    result = run_fail2ban(path, FILTERS[step])
                    if result["lines"] != generated["lines"]:
                        raise SystemExit(f"fail2ban read {result['lines']} lines, expected "
                                         f"{generated['lines']}")
                    matched[step] = result["matched"]
                    for key in ("wall_s", "processed_s"):
                        f2b[step][key].append(result[key])
                    say(f"round {rnd + 1}: fail2ban {step} {result['processed_s']:.2f} s "
                        f"processed, {result['wall_s']:.2f} s wall")

    n = generated["lines"]
    both_processed = [sum(vals) for vals in zip(*(f2b[f]["processed_s"] for f in FILTERS),
                                                strict=True)]
    both_wall = [sum(vals) for vals in zip(*(f2b[f]["wall_s"] for f in FILTERS), strict=True)]
    ours_rate = n / summary(ours)["median"]
    rates = {
        "ours": {"seconds": summary(ours), "lines_per_second": ours_rate},
        **{f"fail2ban_{name}": {
            "processed_seconds": summary(f2b[name]["processed_s"]),
            "wall_seconds": summary(f2b[name]["wall_s"]),
            "lines_per_second": n / summary(f2b[name]["processed_s"])["median"],
            "lines_per_second_wall": n / summary(f2b[name]["wall_s"])["median"],
            "matched_lines": matched[name]} for name in FILTERS},
        "fail2ban_both": {
            "processed_seconds": summary(both_processed), "wall_seconds": summary(both_wall),
            "lines_per_second": n / summary(both_processed)["median"],
            "lines_per_second_wall": n / summary(both_wall)["median"]},
    }
    ratios = {
        "ours/fail2ban_both": ratio(ours_rate, rates["fail2ban_both"]["lines_per_second"]),
        "ours/fail2ban_both_wall": ratio(ours_rate,
                                         rates["fail2ban_both"]["lines_per_second_wall"]),
        **{f"ours/fail2ban_{name}": ratio(ours_rate, rates[f"fail2ban_{name}"][
            "lines_per_second"]) for name in FILTERS},
    }
    for name, entry in rates.items():
        say(f"{name:18s} {entry['lines_per_second']:>12,.0f} lines/s")
    for key, value in ratios.items():
        say(f"{key:28s} {value:6.1f}x")
    both = ratios["ours/fail2ban_both"]
    path_out = write_result("logs", args.out, {
        "mode": "quick" if args.quick else "full",
        "issue": "mail monitoring (log ingestion)",
        "rounds": mode.rounds,
        "workload": {
            "lines": n, "bytes": generated["bytes"],
            "description": "syslog mail.log mixing Postfix and Dovecot: " + ", ".join(
                f"{kind.__name__} {weight}" for kind, weight in MIX) + " (session weights)",
            "events": generated["expected"], "our_line_results": line_results},
        "candidate": "LogSource(format=maillog): LogFollower 1 MiB batches + parse_maillog + "
                     "counting, in process, gc enabled",
        "baseline": f"{fail2ban_version()}: fail2ban-regex --print-no-missed --usedns=no "
                    "<file> filter.d/{dovecot,postfix}.conf as shipped, one child per filter",
        "rates": rates, "ratios": ratios,
        "targets": [{
            "target": f"log parsing at least {TARGET_RATIO:g}x fail2ban-regex's rate "
                      "(dovecot + postfix filters on the same file)",
            "measured": f"{both:.1f}x ({ours_rate:,.0f} vs "
                        f"{rates['fail2ban_both']['lines_per_second']:,.0f} lines/s)",
            "met": both >= TARGET_RATIO}],
    })
    say(f"wrote {path_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
