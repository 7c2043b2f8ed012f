"""The security routes in process: Dovecot answers, the cached API key, the audit query API."""

from __future__ import annotations

import datetime
import json
import os

import httpx
import pytest

from exporter.config import load_config
from exporter.http import create_app
from exporter.http.security_routes import SecretCache
from exporter.service import Exporter
from security.attempts import Decision
from security.protocols import dovecot, stalwart

TOKEN = "adm1n-token-0123456"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
MSG = "Authentication temporarily refused"


@pytest.fixture
def serve(config_file, tmp_path):
    """(exporter, client) on the app in process (ASGITransport: the client is 127.0.0.1)."""
    built: list[Exporter] = []
    (tmp_path / "admin.token").write_text(TOKEN)

    async def build(security: dict | None = None) -> tuple[Exporter, httpx.AsyncClient]:
        config = config_file({"security": {
            "store": {"type": "memory"}, "trusted_networks": [], "max_login_attempts": 3,
            "admin_token_file": str(tmp_path / "admin.token"),
            "tarpit": {"delay_per_failure": "1s", "max_delay": "3s"}, **(security or {})}})
        exporter = Exporter(load_config(config))
        built.append(exporter)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(exporter)),
                                   base_url="http://exporter")
        return exporter, client

    yield build
    for exporter in built:
        if exporter.audit is not None:
            exporter.audit.close()


def policy(login: str, remote: str, pwhash: str, **extra) -> dict:
    return {"login": login, "remote": remote, "pwhash": pwhash, "protocol": "imap", **extra}


# --- Dovecot answers

@pytest.mark.parametrize("decision", [
    Decision("allow", "ok"), Decision("allow", "trusted"), Decision("delay", "tarpit", 1.0),
    Decision("delay", "tarpit", 2.5), Decision("delay", "tarpit", 0.2),
    Decision("delay", "tarpit", 500.0), Decision("reject", "banned", message=MSG),
    Decision("reject", "locked", message="Zoë's \"locked\""), Decision("reject", "locked"),
])
def test_answer_bodies_are_the_json_of_the_answers(decision):
    expected = json.dumps(dovecot.answer(decision), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()
    assert dovecot.answer_body(decision) == expected
    assert dovecot.answer_body(decision) == expected  # the cached body is the same


async def test_dovecot_answers_over_http(serve):
    _, client = await serve()
    url = "/dovecot/policy"
    r = await client.post(url, params={"command": "allow"}, json=policy("al", "192.0.2.5", "a"))
    assert (r.status_code, r.content) == (200, b'{"status":0,"msg":""}')
    assert r.headers["content-type"] == "application/json"
    for n in range(2):
        r = await client.post(url, params={"command": "report"},
                              json=policy("al", "192.0.2.5", f"h{n}", success=False))
        assert r.content == b'{"status":0,"msg":""}'
    r = await client.post(url, params={"command": "allow"}, json=policy("al", "192.0.2.5", "a"))
    assert r.json() == {"status": 2, "msg": ""}  # tarpit: 2 distinct failures, 1 s each
    await client.post(url, params={"command": "report"},
                      json=policy("al", "192.0.2.5", "h2", success=False))  # third: locked
    r = await client.post(url, params={"command": "allow"}, json=policy("al", "192.0.2.5", "a"))
    assert r.json() == {"status": -1, "msg": MSG}
    # other query strings than Dovecot's two still work (Starlette parses them)
    r = await client.post(url + "?x=1&command=allow", json=policy("bo", "2001:db8::7", "a"))
    assert r.json() == {"status": 0, "msg": ""}
    # a repeated parameter: the last one wins, as Starlette's query_params have it
    r = await client.post(url + "?command=allow&command=report",
                          json=policy("bo", "2001:db8::7", "a"))
    assert r.status_code == 400 and "success" in r.json()["message"]


async def test_the_policy_route_is_tried_first_and_keeps_its_answers(serve):
    exporter, client = await serve()
    guard = create_app(exporter)
    paths = [route.path for route in guard.app.router.routes]
    assert paths[0] == "/dovecot/policy" and paths.count("/dovecot/policy") == 1
    assert {"/metrics", "/livez", "/api/v1/security/check"} <= set(paths)
    # the other methods still answer 405, and the route label stays the template
    r = await client.get("/dovecot/policy")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    r = await client.post("/dovecot/policy", params={"command": "allow"},
                          json=policy("al", "192.0.2.5", "a"))
    assert r.status_code == 200
    assert exporter.http_requests.value(("/dovecot/policy", "200")) == 1
    assert exporter.http_requests.value(("/dovecot/policy", "405")) == 1


@pytest.mark.parametrize("body, message", [
    ({"login": "a", "remote": "10.0.0.01", "protocol": 5}, "remote: not an IP address"),
    ({"login": "a", "remote": "::ffff:10.0.0.1 ", "protocol": 5}, "protocol: expected"),
    ({"login": "a", "remote": "1.2.3.4\u0000"}, "remote: not an IP address"),
])
async def test_dovecot_request_errors_keep_their_order(serve, body, message):
    _, client = await serve()
    r = await client.post("/dovecot/policy", params={"command": "allow"}, json=body)
    assert r.status_code == 400 and r.json()["message"].startswith(message)


# --- the API key, cached

def test_secret_cache_rereads_a_changed_file_after_the_recheck_interval(tmp_path):
    key = tmp_path / "key"
    key.write_text("one\n")
    now = [100.0]
    cache = SecretCache("api_key", recheck=1.0, clock=lambda: now[0])
    section = {"api_key_file": str(key), "api_key_env": ""}
    assert cache.get(section) == "one"
    key.write_text("two\n")
    os.utime(key, ns=(1, 1))  # a different mtime even on a coarse clock
    assert cache.get(section) == "one"  # within the interval: no stat, no read
    now[0] += 1.0
    assert cache.get(section) == "two"
    now[0] += 5.0
    assert cache.get(section) == "two"
    key.write_text("six\n")
    os.utime(key, ns=(1, 1))  # same mtime and size: unchanged as far as the cache knows
    now[0] += 5.0
    assert cache.get(section) == "two"
    cache.clear()  # a config reload
    assert cache.get(section) == "six"
    other = tmp_path / "other"
    other.write_text("seven")
    assert cache.get({"api_key_file": str(other)}) == "seven"  # another file: read at once
    key.unlink()
    with pytest.raises(OSError):
        cache.get(section)


def test_secret_cache_follows_the_environment_variable(monkeypatch):
    now = [0.0]
    cache = SecretCache("api_key", clock=lambda: now[0])
    section = {"api_key_file": "", "api_key_env": "A3M_TEST_KEY"}
    monkeypatch.delenv("A3M_TEST_KEY", raising=False)
    assert cache.get(section) is None
    monkeypatch.setenv("A3M_TEST_KEY", "env-key")
    now[0] += 2
    assert cache.get(section) == "env-key"


async def test_a_changed_api_key_file_is_used_after_a_reload(serve, tmp_path):
    key = tmp_path / "dovecot.key"
    key.write_text("first")
    exporter, client = await serve({"dovecot_policy": {
        "api_key_file": str(key), "allow_loopback_without_key": False}})
    url, body = "/dovecot/policy?command=allow", policy("al", "192.0.2.9", "a")

    async def status(sent: str) -> int:
        return (await client.post(url, json=body, headers={"X-API-Key": sent})).status_code

    assert (await status("first"), await status("second")) == (200, 401)
    key.write_text("second")
    assert exporter.reload() == []
    assert (await status("first"), await status("second")) == (401, 200)


@pytest.mark.parametrize("configured", [None, "right-key"])
async def test_a_key_presented_from_loopback_is_checked(serve, tmp_path, configured):
    """With allow_loopback_without_key, a loopback request that sent a wrong key (any key,
    with none configured; or an empty one) was taken as one that sent none; only a request
    with no key header gets the allowance."""
    key = tmp_path / "dovecot.key"
    key.write_text(configured or "")
    exporter, client = await serve({"dovecot_policy": {
        "api_key_file": str(key) if configured else "", "api_key_env": ""}})
    url, body = "/dovecot/policy?command=allow", policy("al", "192.0.2.9", "a")

    async def status(headers: dict) -> tuple[int, str]:
        r = await client.post(url, json=body, headers=headers)
        return r.status_code, r.json().get("error", "")

    assert await status({}) == (200, "")
    for wrong in ("wrong-key", ""):
        assert await status({"X-API-Key": wrong}) == (401, "unauthorized"), wrong
    assert await status({"X-API-Key": "right-key"}) == ((200, "") if configured else (
        401, "unauthorized"))
    assert exporter.security_frontends.value(("dovecot", "unauthorized")) == (
        2 if configured else 3)


# --- the audit query API

async def test_audit_api_pages_and_filters(serve):
    exporter, client = await serve()
    assert exporter.audit is not None
    for i in range(25):
        exporter.audit.record(["lockout.lock", "blocklist.ban"][i % 2],
                              ["engine", "admin"][i % 3 == 0], f"user{i}", {"i": i})
    seen, cursor = [], None
    while True:
        params = {"type": "lockout.", "limit": "4", **({"cursor": cursor} if cursor else {})}
        r = await client.get("/api/v1/security/audit", params=params, headers=ADMIN)
        assert r.status_code == 200
        page = r.json()
        seen += [rec["details"]["i"] for rec in page["records"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(24, -1, -2))
    r = await client.get("/api/v1/security/audit", params={"actor": "admin", "type": [
        "lockout.lock", "blocklist.ban"]}, headers=ADMIN)
    assert [rec["details"]["i"] for rec in r.json()["records"]] == list(range(24, -1, -3))
    r = await client.get("/api/v1/security/audit", params={"cursor": "x"}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"] == "bad_request"
    r = await client.get("/api/v1/security/audit/verify", headers=ADMIN)
    assert r.status_code == 200 and r.json()["ok"] and r.json()["count"] == 25


@pytest.mark.parametrize("params, expected", [
    ({"limit": "-1"}, "limit: expected a whole number from 1"),
    ({"limit": "0"}, "limit: expected a whole number from 1"),
    ({"limit": "ten"}, "limit: expected a whole number from 1"),
    ({"limit": "1001"}, "limit: expected a whole number from 1 to 1000, got '1001'"),
    ({"limit": "9" * 5000}, "limit: expected a whole number from 1 to 1000"),
    ({"start": "garbage"}, "start: expected a Unix time in seconds, got 'garbage'"),
    ({"end": "nan"}, "end: expected a Unix time in seconds"),
])
async def test_audit_api_bad_parameters_get_a_clear_400(serve, params, expected):
    _, client = await serve()
    r = await client.get("/api/v1/security/audit", params=params, headers=ADMIN)
    assert r.status_code == 400 and r.json() == {"error": "bad_request", "message": r.json()[
        "message"]} and r.json()["message"].startswith(expected)


async def test_audit_api_answers_a_record_holding_a_lone_surrogate(serve):
    """One written before the front ends refused them: the log holds it \\u-escaped, the
    answer escapes it too instead of failing to encode it (500)."""
    exporter, client = await serve()
    assert exporter.audit is not None
    exporter.audit.record("lockout.lock", "engine", "a:bad\ud800", {})
    exporter.audit.record("lockout.lock", "engine", "a:caf\u00e9", {})
    r = await client.get("/api/v1/security/audit", headers=ADMIN)
    assert r.status_code == 200
    assert [rec["subject"] for rec in r.json()["records"]] == ["a:caf\u00e9", "a:bad\ud800"]
    assert b"caf\\u00e9" in r.content


async def test_an_exported_blocklist_imported_again_keeps_each_entrys_source(serve):
    """A backup and restore turned every automatic and feed ban into a manual one."""
    _, client = await serve()
    text = "100.79.0.1 source=automatic # bruteforce\n100.79.0.2 source=feed:spamhaus # drop\n"
    r = await client.post("/api/v1/security/blocklist.txt", content=text, headers=ADMIN)
    assert r.json() == {"imported": 2, "errors": []}
    exported = (await client.get("/api/v1/security/blocklist.txt", headers=ADMIN)).text
    assert exported.splitlines() == ["100.79.0.1/32 source=automatic # bruteforce",
                                     "100.79.0.2/32 source=feed:spamhaus # drop"]
    # a feed name is one word: it is exported as source=feed:NAME, and read back
    r = await client.post("/api/v1/security/blocklist.txt?feed=a%20b", content="100.79.0.3\n",
                          headers=ADMIN)
    assert r.status_code == 400 and "feed" in r.json()["message"]


# --- bans: the networks they name and the answers they give

async def test_a_mapped_ban_is_its_ipv4_network_and_a_mapped_prefix_below_96_is_refused(serve):
    """::ffff:10.0.0.0/104 is 10.0.0.0/8: it bans IPv4 clients and is listed and lifted as
    that. Below /96 a mapped network is not one: ::ffff:0:0/95 was taken as ::fffe:0:0/95,
    a ban of nothing any client sends."""
    _, client = await serve()
    url = "/api/v1/security/blocklist"
    r = await client.post(url, json={"network": "::ffff:10.0.0.0/104"}, headers=ADMIN)
    assert (r.status_code, r.json()["banned"]["network"]) == (201, "10.0.0.0/8")
    r = await client.post("/api/v1/security/check", headers=ADMIN,
                          json={"login": "al", "remote_ip": "10.1.2.3"})
    assert (r.json()["action"], r.json()["reason"]) == ("reject", "banned")
    assert [b["network"] for b in (await client.get(url, headers=ADMIN)).json()["bans"]] == [
        "10.0.0.0/8"]
    r = await client.delete(url, params={"network": "::ffff:10.0.0.0/104"}, headers=ADMIN)
    assert (r.status_code, r.json()["unbanned"]["network"]) == (200, "10.0.0.0/8")
    for network in ("::ffff:0:0/95", "::ffff:10.0.0.0/80", "::ffff:1.2.3.4/64"):
        r = await client.post(url, json={"network": network}, headers=ADMIN)
        assert r.status_code == 400, network
        assert r.json() == {"error": "bad_request", "message": (
            f"network: an IPv4-mapped network needs a prefix of /96 or longer (/96 is all "
            f"of IPv4): {network!r}")}
    assert (await client.get(url, headers=ADMIN)).json()["bans"] == []


async def test_a_ban_of_every_address_is_refused_by_the_api_and_the_import(serve):
    """0.0.0.0/0 (or ::/0, or ::ffff:0:0/96, which is 0.0.0.0/0) was taken, and refused
    every client."""
    _, client = await serve()
    url = "/api/v1/security/blocklist"
    for network in ("0.0.0.0/0", "::/0", "::ffff:0:0/96", "192.0.2.1/0"):
        r = await client.post(url, json={"network": network}, headers=ADMIN)
        assert r.status_code == 400, network
        assert r.json()["error"] == "bad_request"
        assert r.json()["message"].startswith(f"network: {network!r} is every "), r.json()
    text = "0.0.0.0/0 # all\n192.0.2.1\n::/0 source=automatic\n"
    r = await client.post(url + ".txt", content=text, headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["imported"] == 1
    assert [(e["line"], e["message"].split(" is every ")[0]) for e in r.json()["errors"]] == [
        (1, "'0.0.0.0/0'"), (3, "'::/0'")]
    assert [b["network"] for b in (await client.get(url, headers=ADMIN)).json()["bans"]] == [
        "192.0.2.1/32"]
    r = await client.post("/api/v1/security/check", headers=ADMIN,
                          json={"login": "al", "remote_ip": "198.51.100.1"})
    assert r.json()["action"] == "allow"


async def test_overlapping_bans_answer_when_the_last_of_them_ends(serve):
    """A client in a /16 banned for a minute and a /8 banned for an hour was told to come
    back in a minute, and refused then: the answer is the latest expiry (a permanent ban
    wins)."""
    _, client = await serve()
    url = "/api/v1/security/blocklist"

    async def ban(network: str, seconds: float | None) -> None:
        r = await client.post(url, headers=ADMIN, json={"network": network,
                                                        "duration_seconds": seconds})
        assert r.status_code == 201

    async def retry_after(ip: str) -> float:
        r = await client.post("/api/v1/security/check", headers=ADMIN,
                              json={"login": "al", "remote_ip": ip})
        assert r.json()["reason"] == "banned"
        return r.json()["retry_after"]

    await ban("10.1.0.0/16", 60)
    await ban("10.0.0.0/8", 3600)
    await ban("10.1.2.3", 600)
    assert 3590 < await retry_after("10.1.2.3") <= 3600
    assert 3590 < await retry_after("10.1.9.9") <= 3600
    await ban("2001:db8::/32", 7200)
    await ban("2001:db8:1::/48", None)  # permanent: retry_after 0, as for any permanent ban
    await ban("2001:db8:1:2::/64", 60)
    assert await retry_after("2001:db8:1:2::5") == 0.0
    assert 7190 < await retry_after("2001:db8:2::5") <= 7200


# --- the Stalwart webhook

def stalwart_event(event_id: str, kind: str, **data) -> dict:
    created = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    return {"id": event_id, "createdAt": created, "type": kind, "data": data}


async def test_webhook_events_that_do_nothing_are_ignored_and_an_empty_id_is_refused(
        serve, tmp_path):
    """An event of no use to the engine (another type, no address, a network for a ban) and
    a batch with an event without an id were counted as accepted; the empty ids also
    shared one replay record, so the second such event was skipped as a replay."""
    (tmp_path / "webhook.key").write_text("hmac-key")
    exporter, client = await serve({"stalwart_webhook": {
        "secret_file": str(tmp_path / "webhook.key")}})

    async def post(events: list[dict]) -> httpx.Response:
        body = json.dumps({"events": events}).encode()
        return await client.post("/api/v1/webhooks/stalwart", content=body, headers={
            "x-signature": stalwart.signature(b"hmac-key", body)})

    useless = [stalwart_event("e1", "server.startup"),
               stalwart_event("e2", "auth.failed", accountName="al"),  # no address
               stalwart_event("e3", "auth.failed", accountName="al", remoteIp="nope"),
               stalwart_event("e4", "security.ip-ban", remoteIp="0.0.0.0/0"),
               stalwart_event("e5", "security.ip-ban")]
    used = [stalwart_event("e6", "auth.failed", accountName="al", remoteIp="192.0.2.7"),
            stalwart_event("e7", "security.ip-ban", remoteIp="198.51.100.7")]
    r = await post(useless + used)
    assert (r.status_code, r.json()) == (200, {"accepted": 2, "skipped": 0, "ignored": 5})
    r = await post(useless + used)  # the same again: the two taken are replays
    assert r.json() == {"accepted": 0, "skipped": 2, "ignored": 5}
    assert [b["network"] for b in (await client.get(
        "/api/v1/security/blocklist", headers=ADMIN)).json()["bans"]] == ["198.51.100.7/32"]
    for blank in ("", "  "):
        r = await post([stalwart_event("e8", "auth.failed", accountName="al",
                                       remoteIp="192.0.2.8"),
                        stalwart_event(blank, "auth.failed", accountName="al",
                                       remoteIp="192.0.2.8")])
        assert (r.status_code, r.json()) == (400, {
            "error": "bad_request", "message": "events[1].id: must not be empty"})
    frontends = exporter.security_frontends
    assert (frontends.value(("stalwart", "ok")), frontends.value(("stalwart", "bad_request"))
            ) == (2, 2)
    r = await post([stalwart_event("e8", "auth.failed", accountName="al",
                                   remoteIp="192.0.2.8")])
    assert r.json() == {"accepted": 1, "skipped": 0, "ignored": 0}  # nothing of it was taken
