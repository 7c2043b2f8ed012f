"""Mail queues: postqueue -j parsing (all five queues, truncated output), postqueue
failing in every way, Stalwart's queue API, the collector and the health check."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalogue
from exporter.collectors.queues import (
    AGE_BUCKETS,
    POSTFIX_QUEUES,
    PostqueueParser,
    QueuesCollector,
    queue_check,
    queue_sources,
    read_postqueue,
)
from exporter.exposition import render_text
from exporter.health import Status
from tests.integration.components import RecordedRequest, RecordingHTTPServer

NOW = 1_700_000_000.0


def record(queue: str, age: float, size: int, recipients: int = 1, reason: str = "") -> str:
    """One line of `postqueue -j` as Postfix 3.7 writes it."""
    rcpts = [{"address": f"user{i}@remote.test", **({"delay_reason": reason} if reason else {})}
             for i in range(recipients)]
    return json.dumps({"queue_name": queue, "queue_id": f"4F2A3{len(queue)}C0F{recipients}",
                       "arrival_time": int(NOW - age), "message_size": size,
                       "forced_expire": False, "sender": "alice@example.test",
                       "recipients": rcpts}) + "\n"


REFUSED = "connect to 127.0.0.1[127.0.0.1]:2525: Connection refused"
POSTQUEUE_OUTPUT = "".join([
    record("maildrop", 2, 410),
    record("incoming", 1, 1200),
    record("active", 30, 5300, recipients=2),
    record("deferred", 4000, 2145, reason=REFUSED),
    record("deferred", 90000, 310000, recipients=3, reason=REFUSED),
    record("deferred", 400, 880, reason="host mx.remote.test said: 451 4.7.1 Try again later"),
    record("hold", 600, 15000),
])


def parse(text: str):
    parser = PostqueueParser(NOW)
    for line in text.encode().splitlines(keepends=True):
        parser.feed(line)
    return parser.finish()


def test_parses_all_five_queues():
    snapshot = parse(POSTQUEUE_OUTPUT)
    assert snapshot.problem == ""
    assert {q: s.messages for q, s in snapshot.queues.items()} == {
        "active": 1, "deferred": 3, "hold": 1, "incoming": 1, "maildrop": 1}
    deferred = snapshot.queues["deferred"]
    assert deferred.bytes == 2145 + 310000 + 880
    assert deferred.recipients == 5
    assert deferred.oldest_age == 90000
    assert deferred.ages.total == 4000 + 90000 + 400
    # ages 400 (<=900), 4000 (<=7200), 90000 (<=172800)
    cumulative = dict(deferred.ages.cumulative())
    assert cumulative["300.0"] == 0 and cumulative["900.0"] == 1
    assert cumulative["7200.0"] == 2 and cumulative["172800.0"] == 3
    assert cumulative["+Inf"] == 3
    assert len(cumulative) == len(AGE_BUCKETS) + 1
    assert dict(snapshot.queues["active"].sizes.cumulative())["10000.0"] == 1
    assert snapshot.total == 7


def test_empty_output_is_five_empty_queues():
    snapshot = parse("")
    assert set(snapshot.queues) == set(POSTFIX_QUEUES)
    assert snapshot.total == 0 and snapshot.problem == ""


def test_truncated_last_line_keeps_the_counts_and_says_so():
    cut = POSTQUEUE_OUTPUT + record("deferred", 10, 999)[:57]  # no newline, no closing brace
    snapshot = parse(cut)
    assert snapshot.total == 7
    assert "truncated" in snapshot.problem and "7 message(s) counted" in snapshot.problem


def test_malformed_lines_and_unknown_queues():
    text = ("not json\n" + record("deferred", 5, 100)
            + '{"queue_name": "deferred"}\n' + record("corrupt", 5, 100))
    snapshot = parse(text)
    assert snapshot.queues["deferred"].messages == 1
    assert "2 unreadable line(s)" in snapshot.problem
    assert "other than the five" in snapshot.note
    assert snapshot.total == 1
    # numbers too large for JSON's doubles are infinite: unreadable lines, not a failure
    # of the whole check (OverflowError)
    huge = parse(record("deferred", 5, 100) + '{"queue_name": "active", "arrival_time": 1, '
                 '"message_size": 1e400}\n{"queue_name": "active", "arrival_time": 1e400, '
                 '"message_size": 1}\n')
    assert huge.queues["deferred"].messages == 1 and huge.queues["active"].messages == 0
    assert "2 unreadable line(s)" in huge.problem
    # a negative size is no size: unreadable, never a negative a3mailer_queue_size_bytes
    negative = parse(record("deferred", 5, 100) + record("active", 5, -4096))
    assert negative.queues["deferred"].messages == 1 and negative.queues["active"].messages == 0
    assert negative.queues["active"].bytes == 0
    assert "1 unreadable line(s), first: ValueError" in negative.problem


def test_a_clock_ahead_of_now_never_gives_a_negative_age():
    snapshot = parse(record("active", -30, 100))
    assert snapshot.queues["active"].oldest_age == 0


# --------------------------------------------------------------------------- running postqueue


def script(tmp_path: Path, body: str, name: str = "postqueue") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_runs_postqueue_with_config_dir(tmp_path):
    (tmp_path / "out.json").write_text(POSTQUEUE_OUTPUT)
    fake = script(tmp_path, f'echo "$@" > {tmp_path}/args\ncat {tmp_path}/out.json\n')
    snapshot = await read_postqueue(fake, "/etc/postfix-out", 5)
    assert (tmp_path / "args").read_text().split() == ["-c", "/etc/postfix-out", "-j"]
    assert snapshot.queues["deferred"].messages == 3 and snapshot.problem == ""


async def test_truncated_output_from_postqueue(tmp_path):
    (tmp_path / "out.json").write_text(POSTQUEUE_OUTPUT + '{"queue_name": "deferred", "queu')
    fake = script(tmp_path, f"cat {tmp_path}/out.json\n")
    snapshot = await read_postqueue(fake, "", 5)
    assert snapshot.total == 7 and "truncated" in snapshot.problem


async def test_postqueue_missing():
    with pytest.raises(Exception, match="postqueue not found"):
        await read_postqueue("/nonexistent/postqueue", "", 5)
    with pytest.raises(Exception, match="postqueue not found"):
        await read_postqueue("postqueue-that-does-not-exist", "", 5)


async def test_postqueue_failing(tmp_path):
    fake = script(tmp_path, "echo 'postqueue: warning: something' >&2\n"
                            "echo 'postqueue: fatal: Queue report unavailable - mail system is "
                            "down' >&2\nexit 69\n")
    with pytest.raises(Exception, match="exited with status 69: postqueue: fatal: Queue report"):
        await read_postqueue(fake, "", 5)


async def test_postqueue_warnings_on_success_become_a_note(tmp_path):
    fake = script(tmp_path, "echo 'postqueue: warning: Mail system is down -- accessing "
                            "queue directly' >&2\n")
    snapshot = await read_postqueue(fake, "", 5)
    assert snapshot.problem == "" and "accessing queue directly" in snapshot.note


async def test_hanging_postqueue_is_killed_at_the_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    fake = script(tmp_path, f"echo $$ > {pidfile}\nexec sleep 30\n")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"did not finish within 0.5s \(killed\)"):
        await read_postqueue(fake, "", 0.5)
    assert time.monotonic() - start < 2
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper that may be slow)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


async def test_a_timeout_kills_a_wrapper_scripts_children_too(tmp_path):
    pidfile = tmp_path / "child.pid"
    fake = script(tmp_path, f"sleep 30 &\necho $! > {pidfile}\nwait\n")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"did not finish within 0.5s \(killed\)"):
        await read_postqueue(fake, "", 0.5)
    # the child holds postqueue's pipes: had it survived, the check would wait for it
    assert time.monotonic() - start < 2
    child = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 2
        while running(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not running(child)
    finally:
        if running(child):
            os.kill(child, 9)


# --------------------------------------------------------------------------- sources + collector


def queues_section(postfix: dict | None = None, stalwart: dict | None = None) -> dict:
    return {
        "postfix": {"enabled": False, "postqueue_path": "postqueue", "config_dir": "",
                    "interval": "30s", "timeout": "5s", **(postfix or {})},
        "stalwart": {"enabled": False, "url": "http://127.0.0.1:1", "username": "",
                     "password_file": "", "password_env": "", "token_file": "",
                     "token_env": "", "interval": "30s", "timeout": "2s", **(stalwart or {})},
    }


def families(collector) -> dict:
    text = render_text(collector.collect()).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        spec = catalogue.METRICS.get(fam.name) or catalogue.METRICS[fam.name + "_total"]
        assert fam.documentation == spec.help
        out[fam.name] = fam
    return out


def samples(fams: dict, name: str) -> dict:
    return {tuple(s.labels.values()): s.value for s in fams[name].samples
            if s.name == name}


async def test_collector_exports_every_postfix_queue(tmp_path):
    (tmp_path / "out.json").write_text(POSTQUEUE_OUTPUT)
    fake = script(tmp_path, f"cat {tmp_path}/out.json\n")
    sources = queue_sources(queues_section({"enabled": True, "postqueue_path": fake}))
    assert list(sources) == ["postfix"]
    await sources["postfix"].once()
    fams = families(QueuesCollector(sources))
    assert samples(fams, "a3mailer_queue_messages") == {
        ("active",): 1, ("deferred",): 3, ("hold",): 1, ("incoming",): 1, ("maildrop",): 1}
    assert samples(fams, "a3mailer_queue_size_bytes")[("deferred",)] == 313025
    assert samples(fams, "a3mailer_queue_recipients")[("active",)] == 2
    assert samples(fams, "a3mailer_queue_total_messages") == {(): 7}
    assert samples(fams, "a3mailer_queue_check_success") == {("postfix",): 1}
    ages = fams["a3mailer_queue_message_age_seconds"].samples
    count = [s.value for s in ages if s.name.endswith("_count") and s.labels["queue"] == "hold"]
    assert count == [1]


async def test_collector_with_an_empty_queue_reports_zeros(tmp_path):
    sources = queue_sources(queues_section({"enabled": True,
                                            "postqueue_path": script(tmp_path, "exit 0\n")}))
    await sources["postfix"].once()
    fams = families(QueuesCollector(sources))
    assert samples(fams, "a3mailer_queue_messages") == {(q,): 0 for q in POSTFIX_QUEUES}
    assert samples(fams, "a3mailer_queue_oldest_message_age_seconds") == {
        (q,): 0 for q in POSTFIX_QUEUES}
    assert samples(fams, "a3mailer_queue_total_messages") == {(): 0}


async def test_truncated_output_is_exported_with_success_0(tmp_path):
    (tmp_path / "out.json").write_text(POSTQUEUE_OUTPUT + '{"queue_na')
    sources = queue_sources(queues_section({"enabled": True, "postqueue_path": script(
        tmp_path, f"cat {tmp_path}/out.json\n")}))
    await sources["postfix"].once()
    fams = families(QueuesCollector(sources))
    assert samples(fams, "a3mailer_queue_check_success") == {("postfix",): 0}
    assert samples(fams, "a3mailer_queue_total_messages") == {(): 7}
    result = await queue_check(sources, 10000)()
    assert result.status is Status.DEGRADED and "truncated" in result.message


async def test_a_failed_check_exports_no_queue_numbers(tmp_path):
    sources = queue_sources(queues_section({"enabled": True, "postqueue_path": script(
        tmp_path, "echo 'postqueue: fatal: bad config' >&2; exit 1\n")}))
    outcome = await sources["postfix"].once()
    assert "fatal: bad config" in outcome.error
    fams = families(QueuesCollector(sources))
    assert samples(fams, "a3mailer_queue_check_success") == {("postfix",): 0}
    assert samples(fams, "a3mailer_queue_messages") == {}
    assert "a3mailer_queue_total_messages" not in fams
    result = await queue_check(sources, 10000)()
    assert result.status is Status.DEGRADED and "postfix: " in result.message
    assert "fatal: bad config" in result.message


async def test_queue_check_threshold_and_first_run(tmp_path):
    (tmp_path / "out.json").write_text(POSTQUEUE_OUTPUT)
    sources = queue_sources(queues_section({"enabled": True, "postqueue_path": script(
        tmp_path, f"cat {tmp_path}/out.json\n")}))
    result = await queue_check(sources, 5)()
    assert result.status is Status.UNKNOWN
    await sources["postfix"].once()
    result = await queue_check(sources, 5)()
    assert result.status is Status.DEGRADED
    assert result.message.startswith("7 messages queued > queue_size_threshold 5")
    assert result.details["postfix"]["deferred"] == 3
    result = await queue_check(sources, 7)()
    assert result.status is Status.HEALTHY and result.message == "7 messages queued"


# --------------------------------------------------------------------------- Stalwart's queue API

TOKEN = "api_c3RhbHdhcnQtbW9uaXRvcmluZw"


def queue_api(request: RecordedRequest) -> tuple[int, str, bytes | str]:
    """Stalwart's management API: GET /api/queue/messages with a Bearer API key."""
    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        return 401, "application/problem+json", (
            '{"type":"about:blank","status":401,"title":"Unauthorized",'
            '"detail":"You have to authenticate first."}')
    if request.path != "/api/queue/messages":
        return 404, "application/problem+json", '{"status":404}'
    return 200, "application/json", json.dumps(
        {"data": {"items": [217834019254714368], "total": 1234, "status": True}})


async def stalwart_queue(url: str, monkeypatch, token: str | None = TOKEN, timeout="2s"):
    if token:
        monkeypatch.setenv("TEST_STALWART_TOKEN", token)
    sources = queue_sources(queues_section(stalwart={
        "enabled": True, "url": url, "timeout": timeout,
        "token_env": "TEST_STALWART_TOKEN" if token else ""}))
    outcome = await sources["stalwart"].once()
    return sources, outcome


async def test_stalwart_queue_total(monkeypatch):
    with RecordingHTTPServer(queue_api) as server:
        sources, outcome = await stalwart_queue(server.url, monkeypatch)
        request = server.wait_for_request()
    assert outcome.ok, outcome.error
    assert request.query == {"limit": ["1"]}  # only the total is needed
    fams = families(QueuesCollector(sources))
    assert samples(fams, "a3mailer_queue_messages") == {("stalwart",): 1234}
    assert samples(fams, "a3mailer_queue_size_bytes") == {}  # Postfix-only detail
    assert samples(fams, "a3mailer_queue_total_messages") == {(): 1234}
    assert samples(fams, "a3mailer_queue_check_success") == {("stalwart",): 1}


async def test_stalwart_queue_401(monkeypatch):
    with RecordingHTTPServer(queue_api) as server:
        sources, outcome = await stalwart_queue(server.url, monkeypatch, token="api_wrong")
        _, anonymous = await stalwart_queue(server.url, monkeypatch, token=None)
    assert "HTTP 401" in outcome.error and "refused" in outcome.error
    assert "HTTP 401" in anonymous.error and "none are configured" in anonymous.error
    assert samples(families(QueuesCollector(sources)), "a3mailer_queue_check_success") == {
        ("stalwart",): 0}


async def test_stalwart_queue_html_and_bad_json(monkeypatch):
    html = "<html><head><title>Stalwart Management</title></head></html>"
    with RecordingHTTPServer(lambda _: (200, "text/html", html)) as server:
        _, outcome = await stalwart_queue(server.url, monkeypatch)
    assert "HTML page" in outcome.error
    with RecordingHTTPServer(lambda _: (200, "application/json", '{"data": []}')) as server:
        _, outcome = await stalwart_queue(server.url, monkeypatch)
    assert "no data.total" in outcome.error


async def test_stalwart_queue_refused_and_silent(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _, outcome = await stalwart_queue(f"http://127.0.0.1:{port}", monkeypatch)
    assert "connection refused" in outcome.error
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        start = time.monotonic()
        sources, outcome = await stalwart_queue(
            f"http://127.0.0.1:{sock.getsockname()[1]}", monkeypatch, timeout="400ms")
        assert time.monotonic() - start < 1.5
    assert "no complete answer within 0.4s" in outcome.error
    assert samples(families(QueuesCollector(sources)), "a3mailer_queue_check_success") == {
        ("stalwart",): 0}


async def test_both_sources_add_up(tmp_path, monkeypatch):
    (tmp_path / "out.json").write_text(POSTQUEUE_OUTPUT)
    monkeypatch.setenv("TEST_STALWART_TOKEN", TOKEN)
    with RecordingHTTPServer(queue_api) as server:
        sources = queue_sources(queues_section(
            {"enabled": True, "postqueue_path": script(tmp_path, f"cat {tmp_path}/out.json\n")},
            {"enabled": True, "url": server.url, "token_env": "TEST_STALWART_TOKEN"}))
        for source in sources.values():
            await source.once()
    fams = families(QueuesCollector(sources))
    assert samples(fams, "a3mailer_queue_total_messages") == {(): 7 + 1234}
    assert samples(fams, "a3mailer_queue_check_success") == {("postfix",): 1, ("stalwart",): 1}
    result = await queue_check(sources, 1000)()
    assert result.status is Status.DEGRADED and "1241 messages queued" in result.message
