"""The security admin API and CLI against the real exporter process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.exporter_process import ROOT

pytestmark = pytest.mark.integration

TOKEN = "s3cret-admin-token-0123"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def exporter(exporter_process, config_file, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN + "\n")
    return exporter_process(config_file({"security": {
        "admin_token_file": str(token), "trusted_networks": [], "max_login_attempts": 3,
        "tarpit": {"enabled": True, "delay_per_failure": "1s", "max_delay": "2s"},
        "auto_ban": {"threshold": 4, "duration": "1h"}}}))


def cli(exporter, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "A3MAILER_ADMIN_TOKEN": TOKEN, "A3MAILER_URL": exporter.url}
    return subprocess.run([sys.executable, "-m", "exporter", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def attempt(login: str, ip: str, pwhash: str, **extra) -> dict:
    return {"login": login, "remote_ip": ip, "pwhash": pwhash, "protocol": "webmail", **extra}


def test_check_report_tarpit_lock_and_ban(exporter):
    url = exporter.url + "/api/v1/security"
    assert httpx.post(url + "/check", json=attempt("bob", "192.0.2.10", "")).status_code == 401
    check = httpx.post(url + "/check", json=attempt("bob", "192.0.2.10", ""), headers=ADMIN)
    assert check.json()["action"] == "allow"
    for n in range(2):
        r = httpx.post(url + "/report", json=attempt("bob", "192.0.2.10", f"h{n}",
                                                     success=False), headers=ADMIN)
        assert r.json() == {"recorded": True, "actions": []}
    tarpit = httpx.post(url + "/check", json=attempt("bob", "192.0.2.10", ""), headers=ADMIN)
    assert tarpit.json()["action"] == "delay" and tarpit.json()["delay"] == 2.0
    r = httpx.post(url + "/report", json=attempt("bob", "192.0.2.10", "h2", success=False),
                   headers=ADMIN)
    assert r.json()["actions"] == ["lock"]
    locked = httpx.post(url + "/check", json=attempt("bob", "192.0.2.10", ""), headers=ADMIN)
    assert locked.json()["action"] == "reject" and locked.json()["reason"] == "locked"
    assert 890 < locked.json()["retry_after"] <= 900
    # a fourth distinct password from that source on another account: source banned
    r = httpx.post(url + "/report", json=attempt("carol", "192.0.2.10", "h3", success=False),
                   headers=ADMIN)
    assert r.json()["actions"] == ["ban"]
    banned = httpx.post(url + "/check", json=attempt("dave", "192.0.2.10", ""), headers=ADMIN)
    assert banned.json()["reason"] == "banned"
    assert httpx.post(url + "/check", json=attempt("dave", "192.0.2.11", ""),
                      headers=ADMIN).json()["action"] == "allow"
    listed = cli(exporter, "security", "list")
    assert listed.returncode == 0, listed.stderr
    both = json.loads(listed.stdout)
    assert [(lock["account"], lock["source"]) for lock in both["lockouts"]] == [
        ("bob", "192.0.2.10/32")]
    assert [ban["network"] for ban in both["bans"]] == ["192.0.2.10/32"]


def test_a_login_with_a_slash_is_unlocked_by_the_cli_and_the_api(exporter):
    """The path form stops at '/': such an account could not be unlocked at all."""
    url = exporter.url + "/api/v1/security"
    for login in ("corp/alice", "corp/bob"):
        for n in range(3):
            httpx.post(url + "/report", json=attempt(login, "192.0.2.20", f"h{n}",
                                                     success=False), headers=ADMIN)
    unlocked = cli(exporter, "security", "unlock", "corp/alice")
    assert unlocked.returncode == 0, unlocked.stderr
    assert [lock["account"] for lock in json.loads(unlocked.stdout)["unlocked"]] == ["corp/alice"]
    r = httpx.delete(url + "/lockouts", params={"account": "corp/bob"}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["unlocked"][0]["account"] == "corp/bob"
    assert httpx.delete(url + "/lockouts", headers=ADMIN).status_code == 400
    assert json.loads(cli(exporter, "security", "lockouts").stdout)["lockouts"] == []


@pytest.mark.parametrize("body", [
    {"login": "x"},  # remote_ip missing
    {"login": "x", "remote_ip": "999.1.1.1"},
    {"login": "x", "remote_ip": "192.0.2.1", "tls": "yes"},
    {"login": "x", "remote_ip": "192.0.2.1", "unexpected": 1},
])
def test_bad_api_bodies_are_400(exporter, body):
    r = httpx.post(exporter.url + "/api/v1/security/check", json=body, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = httpx.post(exporter.url + "/api/v1/security/report", json=attempt("x", "192.0.2.1", ""),
                   headers=ADMIN)
    assert r.status_code == 400 and "success" in r.json()["message"]


def test_cli_ban_list_export_import_unban_and_audit_verify(exporter, tmp_path):
    ban = cli(exporter, "security", "ban", "198.51.100.0/24", "--reason", "spam run",
              "--duration", "2h")
    assert ban.returncode == 0, ban.stderr
    assert json.loads(ban.stdout)["banned"]["network"] == "198.51.100.0/24"
    r = httpx.post(exporter.url + "/api/v1/security/check",
                   json=attempt("eve", "198.51.100.77", ""), headers=ADMIN)
    assert r.json()["reason"] == "banned"
    listed = json.loads(cli(exporter, "security", "bans").stdout)["bans"]
    assert [(b["network"], b["source"], b["reason"]) for b in listed] == [
        ("198.51.100.0/24", "manual", "spam run")]
    exported = cli(exporter, "security", "export").stdout
    assert exported.startswith("198.51.100.0/24 expires=")
    feed = tmp_path / "drop.txt"
    feed.write_text("; Spamhaus-style DROP list\n203.0.113.0/24 ; SBL1\nnot-a-network\n")
    imported = json.loads(cli(exporter, "security", "import", str(feed), "--feed",
                              "drop").stdout)
    assert imported["imported"] == 1 and imported["errors"][0]["line"] == 3
    sources = {b["network"]: b["source"] for b in json.loads(
        cli(exporter, "security", "bans").stdout)["bans"]}
    assert sources["203.0.113.0/24"] == "feed:drop"
    assert cli(exporter, "security", "unban", "198.51.100.0/24").returncode == 0
    assert cli(exporter, "security", "unban", "198.51.100.0/24").returncode == 1  # 404
    assert httpx.post(exporter.url + "/api/v1/security/check",
                      json=attempt("eve", "198.51.100.77", ""),
                      headers=ADMIN).json()["action"] == "allow"
    metrics = httpx.get(exporter.url + "/metrics").text
    assert 'a3mailer_security_active_bans{source="feed"} 1.0' in metrics
    assert 'a3mailer_security_audit_events_total{type="blocklist.ban"} 2.0' in metrics

    verify = cli(exporter, "audit", "verify", "--state-dir", str(exporter.state_dir))
    assert verify.returncode == 0 and "OK:" in verify.stdout
    assert exporter.stop() == 0
    log = exporter.state_dir / "audit.log"
    lines = log.read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == [
        "blocklist.ban", "blocklist.ban", "blocklist.unban"]
    lines[1] = lines[1].replace("SBL1", "SBL2")
    log.write_text("\n".join(lines) + "\n")
    broken = cli(exporter, "audit", "verify", "--file", str(log))
    assert broken.returncode == 1 and "BROKEN at seq 2" in broken.stdout


def test_cli_without_token_or_server(exporter, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "A3MAILER_ADMIN_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "exporter", "security", "bans"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no admin token" in r.stderr
    token = tmp_path / "wrong"
    token.write_text("nope")
    r = cli(exporter, "security", "--token-file", str(token), "bans")
    assert r.returncode == 1 and json.loads(r.stdout)["error"] == "unauthorized"
    # the options after the action work the same
    r = cli(exporter, "security", "bans", "--token-file", str(token))
    assert r.returncode == 1 and json.loads(r.stdout)["error"] == "unauthorized"
    r = cli(exporter, "security", "unlock", "nobody", "--token-file", str(tmp_path / "gone"))
    assert r.returncode == 2 and "cannot read the admin token: No such file" in r.stderr
    assert "Traceback" not in r.stderr
    # bad arguments are a line and exit 2, not a traceback
    r = cli(exporter, "security", "ban", "192.0.2.9", "--duration", "bogus")
    assert r.returncode == 2 and r.stderr.startswith("--duration: bad duration 'bogus'")
    r = cli(exporter, "security", "import", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt: cannot read: No such file" in r.stderr
    assert "Traceback" not in r.stderr
    # a ban of every address, or of a mapped prefix that names no IPv4 network: exit 1
    # with the API's 400 (0.0.0.0/0 was banned and refused every client)
    for network, message in (("0.0.0.0/0", "network: '0.0.0.0/0' is every IPv4 address"),
                             ("::ffff:0:0/95", "network: an IPv4-mapped network needs a "
                                               "prefix of /96 or longer")):
        r = cli(exporter, "security", "ban", network)
        assert r.returncode == 1, r.stdout
        assert json.loads(r.stdout)["error"] == "bad_request"
        assert json.loads(r.stdout)["message"].startswith(message)
    assert json.loads(cli(exporter, "security", "bans").stdout)["bans"] == []


def test_a_second_exporter_on_a_state_dir_in_use_says_so_and_exits(exporter, exporter_process):
    """It started with a 35-line traceback from the audit log's lock; with the audit log
    off it started and disagreed with the first about keys and bans."""
    second = exporter.state_dir
    from tests.exporter_process import ExporterProcess

    proc = ExporterProcess(second.parent / "second", state_dir=second)
    (second.parent / "second").mkdir()
    proc.start(wait=False)
    assert proc.proc is not None and proc.proc.wait(30) == 2
    log = proc.log()
    assert "in use by another exporter (pid" in log and "Traceback" not in log
    proc.stop()


def test_the_cli_never_follows_a_redirect_with_the_token(tmp_path):
    """urllib's default opener followed a 307 to another origin with the Authorization
    header (a review saw the token arrive there)."""
    import http.server
    import threading
    from types import SimpleNamespace

    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("authorization"))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"bans": []}')

        def log_message(self, *args) -> None:
            return None

    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://localhost:{elsewhere.server_address[1]}"

    class Redirect(Elsewhere):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(307)
            self.send_header("location", target + self.path)
            self.send_header("content-length", "0")
            self.end_headers()

    redirect = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (elsewhere, redirect):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = cli(SimpleNamespace(url=f"http://127.0.0.1:{redirect.server_address[1]}"),
                "security", "bans")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["error"] == "redirected"
        assert seen == []  # the token never left for the other origin
        assert TOKEN not in r.stdout + r.stderr
    finally:
        for server in (elsewhere, redirect):
            server.shutdown()
            server.server_close()


@pytest.mark.parametrize("body", [False, True], ids=["slow-headers", "slow-body"])
def test_the_cli_timeout_bounds_the_whole_request(body):
    """A server that answers a header line (or a body byte) every 0.2 s: each read is
    quick, so urllib's per-read timeout never fired and the CLI waited 20 s (slow
    headers) or without end (slow body); --timeout 1 ends it after a second."""
    from types import SimpleNamespace

    from tests.integration.components import DribblingHTTPServer

    with DribblingHTTPServer(gap=0.2, body=body) as slow:
        started = time.monotonic()
        r = cli(SimpleNamespace(url=slow.url), "security", "bans", "--timeout", "1")
        took = time.monotonic() - started
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert json.loads(r.stdout) == {"error": "timed_out",
                                    "message": "no complete answer within 1 s"}
    assert took < 8, f"the CLI took {took:.1f} s"  # a Python start-up included
    for bad in ("0", "-1", "nan", "inf", "soon"):
        r = cli(SimpleNamespace(url=slow.url), "security", "--timeout", bad, "bans")
        assert r.returncode == 2 and "not a number of seconds above 0" in r.stderr, bad


def signed(secret: bytes, events: list[dict]) -> tuple[bytes, dict]:
    from security.protocols.stalwart import signature

    body = json.dumps({"events": events}).encode()
    return body, {"x-signature": signature(secret, body), "content-type": "application/json"}


def event(event_id: str, kind: str, age: float = 0, **data) -> dict:
    import datetime

    created = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=age)
    return {"id": event_id, "createdAt": created.isoformat().replace("+00:00", "Z"),
            "type": kind, "data": data}


def test_stalwart_webhook_feeds_the_engine(exporter_process, config_file, tmp_path):
    secret = tmp_path / "webhook.key"
    secret.write_bytes(b"hmac-key")
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    exporter = exporter_process(config_file({"security": {
        "admin_token_file": str(token), "trusted_networks": [], "max_login_attempts": 3,
        "stalwart_webhook": {"secret_file": str(secret)}}}))
    url = exporter.url + "/api/v1/webhooks/stalwart"
    check = exporter.url + "/api/v1/security/check"
    failures = [event(f"ev{n}", "auth.failed", accountName="frank", remoteIp="192.0.2.50",
                      protocol="imap") for n in range(3)]

    body, headers = signed(b"wrong-key", failures)
    r = httpx.post(url, content=body, headers=headers)
    assert r.status_code == 401
    assert httpx.post(check, json=attempt("frank", "192.0.2.50", ""),
                      headers=ADMIN).json()["action"] == "allow"  # nothing changed

    body, headers = signed(b"hmac-key", failures)
    assert httpx.post(url, content=body, headers=headers).json() == {
        "accepted": 3, "skipped": 0, "ignored": 0}
    assert httpx.post(check, json=attempt("frank", "192.0.2.50", ""),
                      headers=ADMIN).json()["reason"] == "locked"
    # the same signed request replayed changes nothing
    assert httpx.post(url, content=body, headers=headers).json() == {
        "accepted": 0, "skipped": 3, "ignored": 0}
    stale_body, stale_headers = signed(b"hmac-key", [
        event("old", "security.authentication-ban", age=3600, remoteIp="198.51.100.9")])
    assert httpx.post(url, content=stale_body, headers=stale_headers).json()["skipped"] == 1
    ban_body, ban_headers = signed(b"hmac-key", [
        event("ban1", "security.authentication-ban", remoteIp="198.51.100.9")])
    assert httpx.post(url, content=ban_body, headers=ban_headers).json()["accepted"] == 1
    bans = httpx.get(exporter.url + "/api/v1/security/blocklist", headers=ADMIN).json()["bans"]
    assert [(b["network"], b["source"]) for b in bans] == [("198.51.100.9/32", "feed:stalwart")]
    # an event bans one address, never a network (0.0.0.0/0 refused every client), and
    # never shortens an operator's ban (a permanent one became the event's 10 minutes)
    assert httpx.post(exporter.url + "/api/v1/security/blocklist", headers=ADMIN,
                      json={"network": "198.51.100.10"}).status_code == 201
    wide_body, wide_headers = signed(b"hmac-key", [
        event("ban2", "security.ip-ban", remoteIp="0.0.0.0/0"),
        event("ban3", "security.ip-ban", remoteIp="198.51.100.10")])
    httpx.post(url, content=wide_body, headers=wide_headers)
    bans = httpx.get(exporter.url + "/api/v1/security/blocklist", headers=ADMIN).json()["bans"]
    assert {(b["network"], b["source"], b["expires"]) for b in bans
            if b["source"] != "feed:stalwart"} == {("198.51.100.10/32", "manual", None)}
    assert "0.0.0.0/0" not in {b["network"] for b in bans}

    bad, bad_headers = signed(b"hmac-key", [{"id": 1}])
    assert httpx.post(url, content=bad, headers=bad_headers).status_code == 400
    garbage = b"\xff not json"
    from security.protocols.stalwart import signature

    r = httpx.post(url, content=garbage, headers={"x-signature": signature(b"hmac-key",
                                                                           garbage)})
    assert r.status_code == 400
    metrics = httpx.get(exporter.url + "/metrics").text
    assert ('a3mailer_security_frontend_requests_total{frontend="stalwart",'
            'outcome="unauthorized"} 1.0') in metrics
    # after a restart on the same state dir the ids are still known: a batch captured
    # within its replay window is not taken again (it was, when only memory held them)
    assert exporter.stop() == 0
    exporter.start()
    assert httpx.post(url, content=body, headers=headers).json() == {
        "accepted": 0, "skipped": 3, "ignored": 0}
    assert httpx.post(url, content=ban_body, headers=ban_headers).json()["skipped"] == 1
