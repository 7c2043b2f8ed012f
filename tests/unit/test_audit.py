"""Audit log: hash chain, tamper reports, restart, torn lines, policy, query, purge, sink."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.audit import (
    ANCHOR_TYPE,
    GENESIS,
    AuditLog,
    AuditLogLocked,
    AuditPolicy,
    verify_file,
)

DAY = 86400.0


class Clock:
    """A settable clock so record times are known."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def open_log(directory: Path, clock: Clock | None = None, **kw) -> AuditLog:
    return AuditLog(directory, clock=clock or Clock(), **kw)


def fill(log: AuditLog, n: int, clock: Clock | None = None, step: float = 1.0) -> list[dict]:
    out = []
    for i in range(n):
        out.append(log.record("lockout.lock", "engine", f"user{i}@example.org", {"i": i}))
        if clock is not None:
            clock.now += step
    return out


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


def written_log(tmp_path: Path, n: int = 20) -> Path:
    with open_log(tmp_path) as log:
        fill(log, n)
    return log.path


# --- chain ---------------------------------------------------------------------------

def test_chain_of_many_records_verifies_and_matches_the_documented_hash(tmp_path):
    with open_log(tmp_path) as log:
        fill(log, 500)
        result = log.verify()
    assert result.ok and result.count == 500
    assert (result.first_seq, result.last_seq) == (1, 500)
    assert log.last_verify_ok is True
    prev = GENESIS
    for seq, raw in enumerate(lines(tmp_path / "audit.log"), start=1):
        rec = json.loads(raw)
        body = {k: v for k, v in rec.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        assert rec["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
        assert (rec["seq"], rec["prev"]) == (seq, prev)
        assert set(rec) == {"seq", "time", "type", "actor", "subject", "details", "prev", "hash"}
        prev = rec["hash"]
    assert result.last_hash == prev


def test_empty_log_verifies(tmp_path):
    with open_log(tmp_path) as log:
        result = log.verify()
    assert result.ok and result.count == 0 and result.last_hash == GENESIS


def test_edited_details_are_reported_at_that_seq(tmp_path):
    path = written_log(tmp_path)
    content = lines(path)
    content[6] = content[6].replace(b'"details":{"i":6}', b'"details":{"i":7}')
    rewrite(path, content)
    result = verify_file(path)
    assert not result.ok
    assert (result.broken_seq, result.broken_line, result.reason) == (7, 7, "content_edited")
    assert result.count == 6 and result.last_seq == 6


def test_edited_subject_of_last_record_is_reported(tmp_path):
    path = written_log(tmp_path)
    content = lines(path)
    content[-1] = content[-1].replace(b"user19", b"user91")
    rewrite(path, content)
    result = verify_file(path)
    assert (result.ok, result.broken_seq, result.reason) == (False, 20, "hash_mismatch")


def test_deleted_line_is_reported_at_the_missing_seq(tmp_path):
    path = written_log(tmp_path)
    content = lines(path)
    del content[9]
    rewrite(path, content)
    result = verify_file(path)
    assert (result.ok, result.broken_seq, result.reason) == (False, 10, "deleted")


def test_deleted_first_line_is_reported(tmp_path):
    path = written_log(tmp_path)
    rewrite(path, lines(path)[1:])
    result = verify_file(path)
    assert (result.ok, result.broken_seq, result.reason) == (False, 1, "deleted")


def test_swapped_lines_are_reported_at_the_first_displaced_seq(tmp_path):
    path = written_log(tmp_path)
    content = lines(path)
    content[4], content[5] = content[5], content[4]
    rewrite(path, content)
    result = verify_file(path)
    assert (result.ok, result.broken_seq, result.reason) == (False, 5, "reordered")


def test_edited_hash_is_reported_at_that_seq(tmp_path):
    path = written_log(tmp_path)
    content = lines(path)
    rec = json.loads(content[11])
    bad = ("0" if rec["hash"][0] != "0" else "1") + rec["hash"][1:]
    content[11] = content[11].replace(rec["hash"].encode(), bad.encode())
    rewrite(path, content)
    result = verify_file(path)
    assert (result.ok, result.broken_seq, result.reason) == (False, 12, "hash_edited")
    assert "seq 12" in str(result)


def test_byte_change_that_parses_the_same_is_still_reported(tmp_path):
    with open_log(tmp_path) as log:
        fill(log, 2)
        log.record("auth.failure", "engine", "zo\u00eb", {"ratio": 1e-05})
        fill(log, 2)
    content = lines(log.path)
    for old, new in ((b"\\u00eb", b"\\u00EB"), (b"1e-05", b"1E-05")):
        assert old in content[2]
        edited = content[2].replace(old, new)
        assert json.loads(edited) == json.loads(content[2])
        rewrite(log.path, content[:2] + [edited] + content[3:])
        result = verify_file(log.path)
        assert (result.ok, result.broken_seq, result.reason) == (False, 3, "not_canonical")


def test_recomputed_hash_still_breaks_the_link(tmp_path):
    """A forger who fixes the edited record's own hash is caught by the next record."""
    path = written_log(tmp_path)
    content = lines(path)
    rec = json.loads(content[3])
    rec["subject"] = "mallory"
    body = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    content[3] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    rewrite(path, content)
    result = verify_file(path)
    assert (result.ok, result.broken_seq, result.reason) == (False, 5, "bad_link")


def test_cut_tail_is_caught_against_the_writers_head(tmp_path):
    with open_log(tmp_path) as log:
        fill(log, 10)
        rewrite(log.path, lines(log.path)[:8])
        assert verify_file(log.path).ok  # a shorter chain is still a chain...
        result = log.verify()  # ...but not the one this writer holds
        assert (result.ok, result.reason, result.broken_seq) == (False, "truncated", 9)
        assert log.last_verify_ok is False


# --- durability ----------------------------------------------------------------------

def test_restart_continues_the_chain(tmp_path):
    with open_log(tmp_path) as log:
        fill(log, 5)
        head = log.last_hash
    with open_log(tmp_path) as log:
        assert (log.last_seq, log.last_hash) == (5, head)
        rec = log.record("blocklist.ban", "admin", "192.0.2.0/24", {"reason": "scan"})
        assert rec is not None and (rec["seq"], rec["prev"]) == (6, head)
        fill(log, 3)
        result = log.verify()
    assert result.ok and result.count == 9


def test_torn_last_line_is_reported_then_moved_aside_on_open(tmp_path):
    path = written_log(tmp_path, 5)
    whole = path.read_bytes()
    torn = b'{"actor":"engine","details":{"i":5},"hash":"ab'
    path.write_bytes(whole + torn)
    result = verify_file(path)
    assert (result.ok, result.reason, result.broken_seq, result.broken_line) == (
        False, "torn", 6, 6)
    assert result.count == 5

    with open_log(tmp_path) as log:
        assert log.torn_bytes_recovered == len(torn)
        assert path.read_bytes() == whole
        assert Path(f"{path}.torn").read_bytes() == torn + b"\n"
        assert log.record("lockout.unlock", "admin", "alice", {})["seq"] == 6
        assert log.verify().ok
    assert verify_file(path).count == 6


def test_records_survive_sigkill(tmp_path):
    """Every record() that returned is in the file after the process is killed."""
    script = (
        "import os, signal, sys\n"
        "from security.audit import AuditLog\n"
        "log = AuditLog(sys.argv[1], fsync_every=10**6, fsync_interval=10**6)\n"
        "for i in range(50):\n"
        "    log.record('auth.failure', 'engine', '198.51.100.7', {'i': i})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True)
    assert proc.returncode == -9, proc.stderr
    result = verify_file(tmp_path / "audit.log")
    assert result.ok and result.count == 50
    with open_log(tmp_path) as log:  # the lock died with the process
        assert log.last_seq == 50


def test_second_writer_is_refused(tmp_path):
    with open_log(tmp_path), pytest.raises(AuditLogLocked):
        open_log(tmp_path)
    open_log(tmp_path).close()


def test_bad_types_are_rejected(tmp_path):
    with open_log(tmp_path) as log:
        for bad in (ANCHOR_TYPE, "", "Lockout.Lock", "lockout lock"):
            with pytest.raises(ValueError):
                log.record(bad, "engine", "x", {})


def test_details_come_back_as_stored(tmp_path):
    with open_log(tmp_path) as log:
        rec = log.record("config.reload", "cli", "", {"path": Path("/etc/x"), "n": (1, 2),
                                                      "name": "Zoë"})
        assert rec["details"] == {"path": "/etc/x", "n": [1, 2], "name": "Zoë"}
        assert log.query()[0] == [rec]
        assert log.counts_by_type == {"config.reload": 1}


# --- policy --------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "types"), [
    ("log_successful_auth", ["auth.success"]),
    ("log_failed_auth", ["auth.failure"]),
    ("log_config_changes", ["config.reload", "config.change"]),
    ("log_privilege_escalation", ["privilege.grant", "apikey.create", "mfa.enroll"]),
    ("log_data_access", ["data.export"]),
])
def test_each_flag_switches_its_types_only(flag, types):
    every = ["auth.success", "auth.failure", "config.reload", "config.change",
             "privilege.grant", "apikey.create", "mfa.enroll", "data.export",
             "lockout.lock", "lockout.unlock", "blocklist.ban", "blocklist.unban",
             "session.revoke"]
    all_on = dict.fromkeys(["log_successful_auth", "log_failed_auth", "log_config_changes",
                            "log_privilege_escalation", "log_data_access"], True)
    assert all(AuditPolicy(**all_on).wants(t) for t in every)
    one_off = AuditPolicy(**{**all_on, flag: False})
    assert [t for t in every if not one_off.wants(t)] == types


def test_seed_defaults_and_disabled_policy(tmp_path):
    policy = AuditPolicy()
    assert policy.retention_seconds == 90 * DAY
    assert not policy.wants("data.read") and policy.wants("auth.success")
    off = AuditPolicy(enabled=False)
    assert not any(off.wants(t) for t in ("lockout.lock", "blocklist.ban", "auth.failure"))
    with open_log(tmp_path, policy=AuditPolicy(log_successful_auth=False)) as log:
        assert log.record("auth.success", "engine", "alice", {}) is None
        assert log.record("auth.failure", "engine", "alice", {})["seq"] == 1
        assert log.counts_by_type == {"auth.failure": 1}
    assert len(lines(log.path)) == 1


# --- query ---------------------------------------------------------------------------

@pytest.fixture
def mixed_log(tmp_path):
    """60 records, one per second from t0: type, actor and subject cycle independently."""
    clock = Clock(1000.0)
    log = open_log(tmp_path, clock)
    types = ["lockout.lock", "lockout.unlock", "blocklist.ban", "auth.failure", "apikey.create"]
    actors = ["engine", "admin", "api:k1"]
    for i in range(60):
        log.record(types[i % 5], actors[i % 3], f"user{i % 4}", {"i": i})
        clock.now += 1
    yield log
    log.close()


def seqs(records):
    return [r["seq"] for r in records]


def test_query_is_newest_first_with_filters(mixed_log):
    records, cursor = mixed_log.query()
    assert seqs(records) == list(range(60, 0, -1)) and cursor is None
    # seq s was written at 1000 + s - 1; start inclusive, end exclusive
    assert seqs(mixed_log.query(start=1010, end=1020)[0]) == list(range(20, 10, -1))
    got = mixed_log.query(types=["lockout."])[0]
    assert {r["type"] for r in got} == {"lockout.lock", "lockout.unlock"} and len(got) == 24
    got = mixed_log.query(types=["lockout.lock", "apikey.create"])[0]
    assert seqs(got) == [s for s in range(60, 0, -1) if (s - 1) % 5 in (0, 4)]
    got = mixed_log.query(actor="api:k1", subject="user1")[0]
    assert seqs(got) == [s for s in range(60, 0, -1) if (s - 1) % 3 == 2 and (s - 1) % 4 == 1]
    assert mixed_log.query(types=["lockout"])[0] == []  # no dot: exact only


@pytest.mark.parametrize("limit", [1, 7, 10, 59, 60])
def test_paging_has_no_gaps_and_no_duplicates(mixed_log, limit):
    expected = [s for s in range(60, 0, -1) if (s - 1) % 5 != 3]
    pages, cursor, seen = 0, None, []
    while True:
        records, cursor = mixed_log.query(types=["lockout.", "blocklist.", "apikey."],
                                          limit=limit, cursor=cursor)
        assert 0 < len(records) <= limit
        seen += seqs(records)
        pages += 1
        if cursor is None:
            break
    assert seen == expected
    assert pages == -(-len(expected) // limit)  # no empty trailing page


def test_paging_sees_records_written_between_pages_only_at_the_top(mixed_log):
    first, cursor = mixed_log.query(limit=30)
    mixed_log.record("blocklist.unban", "admin", "user9", {})
    second, cursor = mixed_log.query(limit=30, cursor=cursor)
    assert seqs(first + second) == list(range(60, 0, -1)) and cursor is None


def test_query_limit_is_capped_and_cursor_checked(tmp_path):
    with open_log(tmp_path) as log:
        fill(log, 1005)
        records, cursor = log.query(limit=5000)
        assert len(records) == 1000 and cursor == "6"
        assert seqs(log.query(cursor=cursor)[0]) == [5, 4, 3, 2, 1]
        with pytest.raises(ValueError):
            log.query(cursor="x")


# --- purge ---------------------------------------------------------------------------

def test_purge_keeps_the_chain_verifiable(tmp_path):
    clock = Clock(0.0)
    policy = AuditPolicy(retention_seconds=10 * DAY)
    with open_log(tmp_path, clock, policy=policy) as log:
        fill(log, 30, clock, step=DAY)  # record s at day s-1
        old = lines(log.path)
        purged = log.purge(now=30 * DAY)  # cutoff day 20: seqs 1..20 go
        assert purged == 20
        anchor = json.loads(lines(log.path)[0])
        assert anchor["type"] == ANCHOR_TYPE and anchor["seq"] == 20
        assert anchor["prev"] == json.loads(old[19])["hash"]
        assert anchor["details"]["purged"] == 20
        assert lines(log.path)[1:] == old[20:]  # kept records are byte for byte the same
        result = log.verify()
        assert result.ok and (result.count, result.first_seq, result.last_seq) == (10, 21, 30)
        assert seqs(log.query()[0]) == list(range(30, 20, -1))
        assert seqs(log.query(cursor="25", limit=2)[0]) == [24, 23]
        fill(log, 5, clock, step=DAY)
        assert log.verify().ok
        assert log.purge(now=30 * DAY) == 0
    with open_log(tmp_path, clock, policy=policy) as log:
        assert log.last_seq == 35
        assert log.purge(now=40 * DAY) == 10  # cutoff day 30
        assert json.loads(lines(log.path)[0])["details"]["purged_total"] == 30
        assert log.record("lockout.lock", "engine", "bob", {})["seq"] == 36
        result = log.verify()
        assert result.ok and (result.first_seq, result.last_seq) == (31, 36)
        assert log.counts_by_type[ANCHOR_TYPE] == 1


def test_purge_of_everything_leaves_an_anchor_to_continue_from(tmp_path):
    clock = Clock(0.0)
    with open_log(tmp_path, clock, policy=AuditPolicy(retention_seconds=DAY)) as log:
        fill(log, 4, clock)
        head = log.last_hash
        assert log.purge(now=10 * DAY) == 4
        result = log.verify()
        assert result.ok and result.count == 0 and result.last_hash == head
        assert log.query() == ([], None)
        assert log.record("mfa.enroll", "admin", "alice", {})["prev"] == head
    assert verify_file(log.path).ok


def test_edited_anchor_and_records_after_it_are_reported(tmp_path):
    clock = Clock(0.0)
    with open_log(tmp_path, clock, policy=AuditPolicy(retention_seconds=DAY)) as log:
        fill(log, 10, clock, step=DAY)
        log.purge(now=10 * DAY)  # keeps day 9: seq 10
    content = lines(log.path)
    bad_anchor = content[0].replace(b'"purged":9', b'"purged":1')
    rewrite(log.path, [bad_anchor] + content[1:])
    # nothing links to an anchor's own hash, so content and hash edits look alike
    result = verify_file(log.path)
    assert (result.reason, result.broken_seq, result.broken_line) == ("hash_mismatch", 9, 1)
    rewrite(log.path, content + [content[0]])
    assert verify_file(log.path).reason == "misplaced_anchor"


def test_purge_refuses_a_tampered_log(tmp_path):
    clock = Clock(0.0)
    with open_log(tmp_path, clock, policy=AuditPolicy(retention_seconds=DAY)) as log:
        fill(log, 5, clock, step=DAY)
        content = lines(log.path)
        rewrite(log.path, content[:1] + content[2:])
        assert log.purge(now=100 * DAY) == 0
        assert lines(log.path) == content[:1] + content[2:]
        assert log.last_verify_ok is False


# --- sink ----------------------------------------------------------------------------

def test_callable_and_file_sinks_get_the_same_lines(tmp_path):
    got: list[str] = []
    clock = Clock(0.0)
    with open_log(tmp_path / "a", clock, sink=got.append,
                  policy=AuditPolicy(retention_seconds=DAY)) as log:
        fill(log, 5, clock, step=DAY)
        before = [raw.decode().rstrip("\n") for raw in lines(log.path)]
        assert got == before
        log.purge(now=4.5 * DAY)
        fill(log, 2)
    after = [raw.decode().rstrip("\n") for raw in lines(log.path)]
    # the sink sees every line as it is written, the anchor when the purge wrote it
    assert got == before + [after[0]] + after[2:]
    assert json.loads(after[0])["type"] == ANCHOR_TYPE and after[1] == before[4]

    stream = io.StringIO()
    with open_log(tmp_path / "b", sink=stream) as log:
        fill(log, 5)
    assert stream.getvalue() == log.path.read_text()


def test_failing_sink_does_not_stop_auditing(tmp_path):
    def broken(line: str) -> None:
        raise OSError("shipper gone")

    with open_log(tmp_path, sink=broken) as log:
        fill(log, 3)
        assert log.sink_errors == 3 and log.verify().ok and log.last_seq == 3


# --- any single-byte corruption is detected -------------------------------------------

records_strategy = st.lists(
    st.tuples(
        st.sampled_from(["auth.failure", "lockout.lock", "blocklist.ban", "config.reload"]),
        st.sampled_from(["engine", "admin", "api:k1", "cli"]),
        st.text(max_size=12),
        st.dictionaries(st.text(max_size=5), st.one_of(
            st.integers(), st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=8), st.booleans(), st.none()), max_size=3),
    ),
    min_size=1, max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=records_strategy, purge_some=st.integers(min_value=0, max_value=6),
       where=st.floats(min_value=0, max_value=1, exclude_max=True),
       byte=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_is_detected_on_its_line(records, purge_some, where, byte):
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(0.0)
        log = open_log(Path(tmp), clock, policy=AuditPolicy(retention_seconds=DAY),
                       fsync_every=10**6)
        for type_, actor, subject, details in records:
            log.record(type_, actor, subject, details)
            clock.now += DAY
        if purge_some:
            log.purge(now=min(purge_some, len(records)) * DAY + DAY - 1)
        log.close()
        data = bytearray(log.path.read_bytes())
        assert verify_file(log.path).ok
        pos = int(where * len(data))
        if data[pos] == byte:
            byte = (byte + 1) % 256
        data[pos] = byte
        log.path.write_bytes(bytes(data))
        result = verify_file(log.path)
        # The writer emits canonical ASCII JSON and verify checks the exact bytes, so even
        # a change that parses to the same record (say \u00e9 -> \u00E9) counts as one.
        assert not result.ok
        assert result.broken_line == data[:pos].count(b"\n") + 1


# --- the write path: canonical text built once, fsync off the caller's thread ----------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actor=st.text(max_size=10), subject=st.text(max_size=10), details=st.one_of(
    st.dictionaries(st.text(max_size=5), st.one_of(
        st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
        st.booleans(), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.one_of(  # not plain: through the JSON round trip
        st.tuples(st.integers()), st.lists(st.text(max_size=3), max_size=2),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)), min_size=1,
        max_size=2)),
    when=st.floats(min_value=-1e12, max_value=1e12))
def test_the_written_line_is_the_canonical_json_of_the_returned_record(actor, subject,
                                                                        details, when):
    with tempfile.TemporaryDirectory() as tmp:
        with open_log(Path(tmp), Clock(when), fsync_every=10**6) as log:
            first = log.record("auth.failure", actor, subject, details)
            rec = log.record("config.reload", actor, subject, details)
        written = lines(log.path)
        assert verify_file(log.path).ok
    assert written[1] == json.dumps(rec, sort_keys=True, separators=(",", ":"),
                                    allow_nan=False).encode("ascii") + b"\n"
    assert json.loads(written[1]) == rec and rec["prev"] == first["hash"]
    body = {k: v for k, v in rec.items() if k != "hash"}
    assert rec["hash"] == hashlib.sha256(json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert rec["details"] == json.loads(json.dumps(details, default=str))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from(
    [True, False, 1, 0, 1.0, 0.0, -0.0, "1", None, 2**70]), max_size=3), min_size=1,
    max_size=12))
def test_details_that_compare_equal_keep_their_own_text(details_list):
    """The details' text is looked up by value, and True == 1 == 1.0 and 0.0 == -0.0: each
    record must still carry the JSON of its own details, whatever came before."""
    from security.audit import _canonical, _details_json

    for details in details_list:
        assert _details_json(details) == _canonical(details) == json.dumps(
            details, sort_keys=True, separators=(",", ":"))


def test_the_details_text_cache_is_bounded(monkeypatch):
    import security.audit as audit

    monkeypatch.setattr(audit, "_DETAILS_TEXT", {})
    monkeypatch.setattr(audit, "_DETAILS_TEXT_MAX", 8)
    for i in range(100):
        assert audit._details_json({"i": i}) == f'{{"i":{i}}}'
        assert len(audit._DETAILS_TEXT) <= 8
    assert audit._details_json({"l": [1]}) == '{"l":[1]}'  # unhashable: encoded, not kept
    assert audit._details_json({1: "x"}) == '{"1":"x"}'  # not str keys: not kept
    assert all(key[0][0][0] == "i" for key in audit._DETAILS_TEXT)


def test_append_writes_what_record_writes_without_building_the_record(tmp_path):
    with open_log(tmp_path / "a", Clock()) as a, open_log(tmp_path / "b", Clock()) as b:
        for i in range(3):
            assert a.append("mfa.verify.success", "api", f"u{i}", {"drift_steps": i}) is True
            assert b.record("mfa.verify.success", "api", f"u{i}", {"drift_steps": i})
        a.policy = b.policy = AuditPolicy(log_successful_auth=False)
        assert a.append("auth.success", "engine", "u", {}) is False
        assert b.record("auth.success", "engine", "u", {}) is None
    assert lines(a.path) == lines(b.path) and len(lines(a.path)) == 3
    assert verify_file(a.path).ok


def test_a_chain_continues_from_a_loaded_hash_that_needs_quoting(tmp_path):
    """The previous hash is written unquoted when it is our own hex digest; a head read
    back from the file may be anything, so it is quoted as JSON."""
    with open_log(tmp_path, Clock()) as log:
        log.record("lockout.lock", "engine", "x", {})
    rec = json.loads(lines(log.path)[0])
    rec["hash"] = 'not "hex"\\'
    log.path.write_bytes(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
                         + b"\n")
    with open_log(tmp_path, Clock()) as log:
        log.record("lockout.unlock", "api", "x", {})
    assert json.loads(lines(log.path)[1])["prev"] == 'not "hex"\\'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False,
                                                                       allow_infinity=False),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_canonical_text_is_exactly_json_dumps(value):
    """The hash chain hangs on these bytes: the encoder built once writes what
    json.dumps(sort_keys, compact separators, allow_nan=False) writes, for any value."""
    from security.audit import _canonical

    assert _canonical(value) == json.dumps(value, sort_keys=True, separators=(",", ":"),
                                           allow_nan=False)


def test_canonical_text_refuses_non_finite_floats_and_non_json_values():
    from security.audit import _canonical

    for bad in ({"a": [float("nan")]}, float("inf"), {"k": {1, 2}}):
        with pytest.raises((ValueError, TypeError)):
            _canonical(bad)


def test_a_non_finite_time_or_detail_is_refused_and_nothing_is_written(tmp_path):
    clock = Clock(float("nan"))
    with open_log(tmp_path, clock) as log:
        with pytest.raises(ValueError):
            log.record("lockout.lock", "engine", "x", {})
        clock.now = 5.0
        with pytest.raises(ValueError):
            log.record("lockout.lock", "engine", "x", {"until": float("inf")})
        assert log.record("lockout.lock", "engine", "x", {})["seq"] == 1
    assert verify_file(log.path).count == 1


def test_records_trigger_fsyncs_that_run_on_the_background_thread(tmp_path, monkeypatch):
    import os
    import threading

    from security import audit as audit_module

    threads: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        threads.append(threading.get_ident())
        real_fsync(fd)

    with open_log(tmp_path, fsync_every=5, fsync_interval=10**6) as log:
        monkeypatch.setattr(os, "fsync", fsync)
        for _ in range(4):
            log.record("lockout.lock", "engine", "x", {})
        audit_module._syncer().submit(lambda: None).result(timeout=5)  # the queue is empty
        assert threads == []  # under fsync_every: nothing yet
        log.record("lockout.lock", "engine", "x", {})
        audit_module._syncer().submit(lambda: None).result(timeout=5)
        assert len(threads) == 1 and threads[0] != threading.get_ident()
        assert log._unsynced == 0
        log.record("lockout.lock", "engine", "x", {})
    assert threads[-1] == threading.get_ident()  # close() syncs the rest itself


def test_by_default_records_are_fsynced_by_time_not_by_count(tmp_path, monkeypatch):
    import os

    from security import audit as audit_module

    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    now = [1000.0]
    monkeypatch.setattr(audit_module.time, "monotonic", lambda: now[0])
    with open_log(tmp_path, fsync_interval=1.0) as log:
        monkeypatch.setattr(os, "fsync", fsync)
        for _ in range(1000):  # far past the old every-100-records rule
            log.record("lockout.lock", "engine", "x", {})
        audit_module._syncer().submit(lambda: None).result(timeout=5)
        assert synced == [] and log._unsynced == 1000
        now[0] += 1.0  # a second later the next record has them synced behind it
        log.record("lockout.lock", "engine", "x", {})
        audit_module._syncer().submit(lambda: None).result(timeout=5)
        assert len(synced) == 1 and log._unsynced == 0
    assert verify_file(log.path).count == 1001


def test_record_goes_on_while_a_sync_waits_for_the_disk(tmp_path, monkeypatch):
    import os
    import threading

    release, entered = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(10)
        real_fsync(fd)

    with open_log(tmp_path, fsync_every=10**6, fsync_interval=10**6) as log:
        log.record("lockout.lock", "engine", "x", {})
        monkeypatch.setattr(os, "fsync", slow_fsync)
        syncing = threading.Thread(target=log.sync)
        syncing.start()
        assert entered.wait(5)
        done = threading.Event()
        writer = threading.Thread(target=lambda: (
            log.record("lockout.lock", "engine", "y", {}), done.set()))
        writer.start()
        assert done.wait(5), "record() waited for the fsync"
        release.set()
        syncing.join(5)
        writer.join(5)
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert log._unsynced == 1  # the record written during the fsync is still pending
    assert verify_file(log.path).count == 2


def test_verify_and_purge_run_while_records_are_written(tmp_path):
    import threading

    clock = Clock(0.0)
    policy = AuditPolicy(retention_seconds=10 * DAY)
    with open_log(tmp_path, clock, policy=policy, fsync_every=10**6) as log:
        fill(log, 300, clock, step=DAY / 10)  # 30 days
        stop = threading.Event()
        written = []

        def write() -> None:
            while not stop.is_set() and len(written) < 3000:
                written.append(log.record("blocklist.ban", "engine", "x", {})["seq"])
                if len(written) % 100 == 0:
                    time.sleep(0.001)  # spread the writes over the verifications

        writer = threading.Thread(target=write)
        writer.start()
        try:
            results = [log.verify() for _ in range(3)]
            purged = log.purge(now=30 * DAY)  # cutoff day 20: the first 200 go
            results.append(log.verify())
        finally:
            stop.set()
            writer.join(10)
        assert all(r.ok for r in results), results
        assert purged == 200 and written
        result = log.verify()
        assert result.ok and result.first_seq == 201 and result.last_seq == 300 + len(written)
        assert seqs(log.query(limit=1000)[0])[:len(written)] == written[::-1][:1000]
    assert verify_file(log.path).ok


def test_a_torn_tail_of_a_large_log_is_found_without_reading_it_all(tmp_path):
    path = written_log(tmp_path, 2000)  # about 400 kB: several of the 64 kB tail chunks
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"actor":"engine"')
    with open_log(tmp_path) as log:
        assert log.torn_bytes_recovered == 17 and log.last_seq == 2000
        assert path.read_bytes() == whole
    path.write_bytes(whole + b"x" * 100_000)  # a torn line longer than one chunk
    with open_log(tmp_path) as log:
        assert log.torn_bytes_recovered == 100_000 and log.last_seq == 2000


# --- the index: bounded, and answers like a scan of the whole file ---------------------

def scan(path: Path) -> list[dict]:
    """Every record of the file, newest first (the reference the index must match)."""
    records = [json.loads(raw) for raw in lines(path)]
    return [r for r in records if r["type"] != ANCHOR_TYPE][::-1]


def reference(records: list[dict], start=None, end=None, types=None, actor=None, subject=None):
    exact = {t for t in types or () if not t.endswith(".")}
    prefixes = tuple(t for t in types or () if t.endswith("."))
    return [r for r in records
            if (start is None or r["time"] >= start) and (end is None or r["time"] < end)
            and (not types or r["type"] in exact or r["type"].startswith(prefixes))
            and (actor is None or r["actor"] == actor)
            and (subject is None or r["subject"] == subject)]


def all_pages(log: AuditLog, limit: int, **filters) -> list[dict]:
    out, cursor = [], None
    while True:
        records, cursor = log.query(limit=limit, cursor=cursor, **filters)
        out += records
        if cursor is None:
            return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=0, max_value=300), blocks=st.integers(min_value=2, max_value=9),
       steps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 7.0]), min_size=1, max_size=20),
       limit=st.sampled_from([1, 3, 10, 1000]),
       start=st.one_of(st.none(), st.floats(min_value=0, max_value=600)),
       span=st.one_of(st.none(), st.floats(min_value=0, max_value=300)),
       types=st.sampled_from([None, ["lockout."], ["auth.failure", "blocklist.ban"]]),
       actor=st.sampled_from([None, "admin"]), subject=st.sampled_from([None, "u1"]))
def test_a_bounded_index_answers_queries_like_a_full_scan(n, blocks, steps, limit, start,
                                                          span, types, actor, subject):
    kinds = ["lockout.lock", "auth.failure", "blocklist.ban", "lockout.unlock"]
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(0.0)
        with open_log(Path(tmp), clock, index_blocks=blocks, fsync_every=10**6) as log:
            for i in range(n):
                log.record(kinds[i % 4], ["engine", "admin"][i % 3 == 0], f"u{i % 5}", {"i": i})
                clock.now += steps[i % len(steps)]
            assert len(log._index) <= blocks
            assert sum(log._index.counts) == n
            end = None if start is None or span is None else start + span
            filters = {"start": start, "end": end, "types": types, "actor": actor,
                       "subject": subject}
            expected = reference(scan(log.path), **filters)
            assert all_pages(log, limit, **filters) == expected
            first, _ = log.query(limit=limit, **filters)
            assert first == expected[:limit]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=1, max_value=200), blocks=st.integers(min_value=2, max_value=7),
       cut=st.integers(min_value=0, max_value=500), more=st.integers(min_value=0, max_value=30))
def test_purge_with_a_bounded_index_drops_what_a_full_scan_would(n, blocks, cut, more):
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(0.0)
        policy = AuditPolicy(retention_seconds=DAY)
        with open_log(Path(tmp), clock, policy=policy, index_blocks=blocks,
                      fsync_every=10**6) as log:
            fill(log, n, clock, step=60.0)
            cutoff = cut * 30.0  # on a record's time (every 60 s) or between two
            before = scan(log.path)[::-1]
            dropped = next((i for i, r in enumerate(before) if r["time"] >= cutoff), n)
            assert log.purge(now=cutoff + DAY) == dropped
            kept = before[dropped:]
            assert scan(log.path)[::-1] == kept and log.verify().ok
            assert sum(log._index.counts) == len(kept) and len(log._index) <= blocks
            fill(log, more, clock, step=60.0)
            assert all_pages(log, 7) == scan(log.path)
            assert log.verify().ok
        with open_log(Path(tmp), clock, policy=policy, index_blocks=blocks) as log:
            assert log.last_seq == n + more and all_pages(log, 50) == scan(log.path)


def test_the_index_of_a_long_log_stays_within_its_block_limit(tmp_path):
    with open_log(tmp_path, index_blocks=64, fsync_every=10**6) as log:
        fill(log, 5000)
        assert len(log._index) <= 64 and log._index.stride == 128
        assert sum(log._index.counts) == 5000
        assert seqs(log.query(limit=3)[0]) == [5000, 4999, 4998]
        assert seqs(log.query(limit=3, cursor="2500")[0]) == [2499, 2498, 2497]
    with open_log(tmp_path, index_blocks=64) as log:  # rebuilt on open, as bounded
        assert len(log._index) <= 64 and seqs(log.query(limit=2, cursor="3")[0]) == [2, 1]


def test_the_exporter_opens_its_audit_log_with_the_configured_fsync_interval(tmp_path):
    from exporter.config.loader import load_config
    from exporter.service import _build_security

    config = load_config(overrides={"security": {"audit_config": {"fsync_interval": "250ms"},
                                                 "store": {"type": "memory"}}})
    audit, engine = _build_security(config, tmp_path)
    try:
        assert audit is not None and engine is not None
        assert audit.fsync_interval == 0.25 and audit._fsync_every > 10**9
    finally:
        audit.close()
