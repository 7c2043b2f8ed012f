"""A distributed password-guessing attack: failed logins from many distinct addresses on
many accounts. Memory stays bounded by the configured caps, the metric series do not
grow, and the real user still gets in."""

from __future__ import annotations

import subprocess

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.exporter_process import ExporterProcess
from tests.integration.components import require_binary
from tests.reliability.conftest import scale
from tests.reliability.test_crash import ADMIN, TOKEN
from tests.reliability.test_faults import metric

ADDRESSES = scale(30_000, 1_000_000)  # distinct source addresses, one failure each
ACCOUNTS = scale(10_000, 100_000)
MAX_KEYS = scale(10_000, 250_000)  # security.store.max_tracked_keys
CHUNK_SECONDS = scale(5, 20)

# each request a new address (10.0.0.0/8 from a counter) and one of ACCOUNTS accounts
LUA = f"""
local n, tid, offset = 0, 0, 0
local threads = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {TOKEN}"
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args) offset = tonumber(args[1]) end
function request()
  n = n + 1
  local i = offset * 1048576 + tid * 524288 + n
  local a = 167772160 + i
  local ip = string.format("%d.%d.%d.%d", math.floor(a / 16777216), math.floor(a / 65536) % 256,
                           math.floor(a / 256) % 256, a % 256)
  return wrk.format(nil, "/api/v1/security/report", nil, string.format(
    '{{"login":"victim%d@example.test","remote_ip":"%s","pwhash":"%x","protocol":"imap",'
    .. '"success":false}}', i % {ACCOUNTS}, ip, i))
end
"""


def series(url: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(text) for s in family.samples}


def report(url: str, login: str, ip: str, pwhash: str, success: bool) -> dict:
    return httpx.post(url + "/api/v1/security/report", headers=ADMIN, timeout=10, json={
        "login": login, "remote_ip": ip, "pwhash": pwhash, "protocol": "imap",
        "success": success}).json()


def check(url: str, login: str, ip: str) -> dict:
    return httpx.post(url + "/api/v1/security/check", headers=ADMIN, timeout=10,
                      json={"login": login, "remote_ip": ip}).json()


def test_distributed_attack_is_bounded_and_the_real_user_gets_in(tmp_path, config_file, record):
    token = tmp_path / "admin.token"
    token.write_text(TOKEN)
    config = {"security": {"admin_token_file": str(token), "trusted_networks": [],
                           "enable_rate_limiting": False,
                           "store": {"max_tracked_keys": MAX_KEYS}}}
    workdir = tmp_path / "exporter"
    workdir.mkdir()
    proc = ExporterProcess(workdir, config_file(config)).start()
    script = tmp_path / "attack.lua"
    script.write_text(LUA)
    server = psutil.Process(proc.proc.pid)  # type: ignore[union-attr]
    try:
        # warm-up: every series the attack can touch exists before the baseline is taken
        report(proc.url, "real@example.test", "192.0.2.10", "good", True)
        report(proc.url, "warm@example.test", "192.0.2.11", "bad", False)
        check(proc.url, "warm@example.test", "192.0.2.11")
        series(proc.url)  # a first scrape, so /metrics's own request series exist
        baseline_series = series(proc.url)
        rss0 = server.memory_info().rss
        sent, chunk, errors = 0, 0, 0
        while sent < ADDRESSES:
            out = subprocess.run(
                [require_binary("wrk"), "-t2", "-c16", f"-d{CHUNK_SECONDS}s", "-s", str(script),
                 proc.url, "--", str(chunk)], capture_output=True, text=True, check=True).stdout
            chunk += 1
            sent += int(out.split(" requests in ")[0].split()[-1])
            if "Non-2xx" in out or "Socket errors" in out:
                errors += 1
        rss1 = server.memory_info().rss
        tracked = metric(proc.url, "a3mailer_security_tracked_keys")
        after_series = series(proc.url)
        # the real user, from the address they always use, with the right password
        decision = check(proc.url, "real@example.test", "192.0.2.10")
        success = report(proc.url, "real@example.test", "192.0.2.10", "good", True)
        # and a victim account from a fresh address: never locked out by the attackers
        victim = check(proc.url, "victim7@example.test", "192.0.2.99")
        audit_bytes = (proc.state_dir / "audit.log").stat().st_size
    finally:
        assert proc.stop() == 0
    grown = after_series - baseline_series
    figures = {
        "failed_logins": sent, "distinct_addresses": sent, "accounts": ACCOUNTS,
        "max_tracked_keys": MAX_KEYS, "tracked_keys_after": tracked,
        "rss_mb_before_after": [round(rss0 / 2**20, 1), round(rss1 / 2**20, 1)],
        "rss_bytes_per_capped_key": round((rss1 - rss0) / MAX_KEYS),
        "series_before_after": [len(baseline_series), len(after_series)],
        "audit_log_mb": round(audit_bytes / 2**20, 1), "errors": errors,
        "real_user_decision": decision["action"], "victim_decision": victim["action"]}
    record["attack"] = figures  # recorded before the checks: a failed run shows as failed
    figures["passed"] = False
    assert sent >= ADDRESSES and errors == 0, figures
    assert tracked <= MAX_KEYS, figures
    # bounded: what MAX_KEYS keys cost (under 2 KiB each with the LRU's overhead), however
    # many addresses came
    assert rss1 - rss0 < MAX_KEYS * 2048 + 64 * 2**20, figures
    assert not grown, sorted(grown)[:10]  # no address or account ever became a series
    assert decision["action"] == "allow" and success["recorded"], figures
    assert victim["action"] == "allow", figures
    figures["passed"] = True
