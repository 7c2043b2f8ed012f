"""The MFA part of the Store interface: one behaviour suite run against memory and SQLite
(and against a real Redis by tests/integration/test_redis_mfa_store.py), plus persistence."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

from security.store import Store
from security.store.sqlite import SqliteStore
from tests.unit import test_security_store as suite

# the store suite's fixtures: memory and SQLite stores, and SQLite stores on one file
make_store, store, sqlite_stores = suite.make_store, suite.store, suite.sqlite_stores


async def test_fields_put_get_and_list(store: Store):
    assert await store.mfa_fields("alice") == {}
    assert await store.mfa_get("alice", "totp") is None
    await store.mfa_put("alice", "totp", "sealed-1")
    await store.mfa_put("alice", "rc:aa", "1")
    await store.mfa_put("bob", "totp", "sealed-2")
    await store.mfa_put("alice", "totp", "sealed-3")  # replaces
    assert await store.mfa_get("alice", "totp") == "sealed-3"
    assert await store.mfa_fields("alice") == {"totp": "sealed-3", "rc:aa": "1"}
    assert await store.mfa_users() == ["alice", "bob"]


async def test_pop_returns_the_value_once(store: Store):
    await store.mfa_put("alice", "otp:email", "h")
    assert await store.mfa_pop("alice", "otp:email") == "h"
    assert await store.mfa_pop("alice", "otp:email") is None
    assert await store.mfa_pop("nobody", "x") is None
    assert await store.mfa_users() == []


async def test_concurrent_pops_hand_the_value_to_one_caller(store: Store):
    await store.mfa_put("alice", "rc:code", "1")
    results = await asyncio.gather(*(store.mfa_pop("alice", "rc:code") for _ in range(8)))
    assert sorted(results, key=str) == ["1"] + [None] * 7


async def test_incr_counts_from_zero(store: Store):
    assert [await store.mfa_incr("alice", "tries") for _ in range(3)] == [1, 2, 3]
    assert await store.mfa_get("alice", "tries") == "3"
    assert await store.mfa_incr("bob", "tries") == 1


async def test_advance_only_moves_forward(store: Store):
    assert await store.mfa_advance("alice", "totp_step", 100) is True
    assert await store.mfa_advance("alice", "totp_step", 100) is False  # the same step again
    assert await store.mfa_advance("alice", "totp_step", 99) is False  # an older one
    assert await store.mfa_advance("alice", "totp_step", 101) is True
    assert await store.mfa_get("alice", "totp_step") == "101"
    assert await store.mfa_advance("alice", "count", 0) is True  # missing: any value goes


async def test_concurrent_advances_to_one_value_succeed_once(store: Store):
    results = await asyncio.gather(*(store.mfa_advance("alice", "step", 7) for _ in range(8)))
    assert results.count(True) == 1


async def test_delete_by_prefix_and_all(store: Store):
    for field in ("rc:1", "rc:2", "rcx", "totp"):
        await store.mfa_put("alice", field, "v")
    await store.mfa_put("bob", "rc:1", "v")
    assert await store.mfa_delete("alice", "rc:") == 2
    assert sorted(await store.mfa_fields("alice")) == ["rcx", "totp"]
    assert await store.mfa_delete("alice", "rc:") == 0
    assert await store.mfa_delete("alice") == 2
    assert await store.mfa_fields("alice") == {}
    assert await store.mfa_fields("bob") == {"rc:1": "v"}
    assert await store.mfa_users() == ["bob"]
    assert await store.mfa_delete("nobody") == 0


async def test_user_names_with_separators_stay_apart(store: Store):
    await store.mfa_put("a:b", "f", "1")
    await store.mfa_put("a", "b:f", "2")
    await store.mfa_put("ünï cödé@example.org", "f", "3")
    assert await store.mfa_fields("a:b") == {"f": "1"}
    assert await store.mfa_fields("a") == {"b:f": "2"}
    assert await store.mfa_get("ünï cödé@example.org", "f") == "3"
    assert await store.mfa_users() == sorted(["a:b", "a", "ünï cödé@example.org"])


# --- SQLite: the state survives a restart (replay state above all)


async def test_sqlite_keeps_mfa_state_across_a_restart(sqlite_stores):
    first: SqliteStore = await sqlite_stores()
    await first.mfa_put("alice", "totp", "sealed")
    await first.mfa_put("alice", "rc:1", "1")
    await first.mfa_put("alice", "rc:2", "1")
    assert await first.mfa_advance("alice", "totp_step", 500)
    assert await first.mfa_pop("alice", "rc:1") == "1"
    await first.mfa_incr("alice", "tries")
    await first.mfa_put("bob", "x", "1")
    assert await first.mfa_delete("bob") == 1
    await first.close()
    second = await sqlite_stores()
    assert await second.mfa_fields("alice") == {"totp": "sealed", "rc:2": "1",
                                                "totp_step": "500", "tries": "1"}
    assert await second.mfa_advance("alice", "totp_step", 500) is False
    assert await second.mfa_users() == ["alice"]


# --- SQLite: MFA changes are journaled before the call returns, committed behind


def journal_files(store: SqliteStore) -> list[str]:
    return [path.name for _, path in store._journals()]


async def test_sqlite_mfa_changes_survive_a_kill_before_any_flush(sqlite_stores):
    first: SqliteStore = await sqlite_stores(flush_interval=3600)
    await first.mfa_put("alice", "totp", "sealed")
    assert await first.mfa_advance("alice", "totp_step", 500)
    await first.mfa_put("alice", "rc:1", "1")
    assert await first.mfa_pop("alice", "rc:1") == "1"
    assert await first.mfa_incr("alice", "tries") == 1
    await first.mfa_put("bob", "x", "1")
    assert await first.mfa_delete("bob") == 1
    assert journal_files(first) == ["security.db.mfa-journal.1"]
    second = await sqlite_stores()  # the first never closed nor flushed: as after SIGKILL
    assert await second.mfa_fields("alice") == {"totp": "sealed", "totp_step": "500",
                                                "tries": "1"}
    assert await second.mfa_users() == ["alice"]
    assert await second.mfa_advance("alice", "totp_step", 500) is False  # no replay


async def test_sqlite_flush_commits_the_journal_and_removes_it(sqlite_stores):
    first: SqliteStore = await sqlite_stores(flush_interval=3600)
    assert await first.mfa_advance("alice", "totp_step", 7)
    await first.flush()
    assert journal_files(first) == ["security.db.mfa-journal.2"]  # the next one, empty
    assert (first.path.parent / "security.db.mfa-journal.2").stat().st_size == 0
    assert await first.mfa_advance("alice", "totp_step", 8)  # only in journal 2
    rows = await first._run(lambda: first._db.execute(
        "SELECT value FROM mfa WHERE user = 'alice' AND field = 'totp_step'").fetchall())
    assert rows == [("7",)]  # the table has what the flush committed
    second = await sqlite_stores()
    assert await second.mfa_get("alice", "totp_step") == "8"
    await second.flush()
    assert journal_files(second) == ["security.db.mfa-journal.4"]


async def test_sqlite_journal_skips_a_torn_or_unreadable_line(sqlite_stores):
    first: SqliteStore = await sqlite_stores(flush_interval=3600)
    assert await first.mfa_advance("alice", "totp_step", 5)
    path = first._journal_path(first._journal_gen)
    with path.open("ab") as fh:
        fh.write(b'["mallory",[["x",7]]]\n{not json\n["alice",[["totp_step","9"')  # no \n
    second = await sqlite_stores()
    assert await second.mfa_fields("alice") == {"totp_step": "5"}
    assert await second.mfa_users() == ["alice"]


async def test_sqlite_a_failed_flush_keeps_the_journal(sqlite_stores, monkeypatch):
    first: SqliteStore = await sqlite_stores(flush_interval=3600)
    assert await first.mfa_advance("alice", "totp_step", 5)

    def broken(*_):
        raise OSError("disk I/O error")

    monkeypatch.setattr(first, "_write_mfa_rows", broken)
    try:
        await first.flush()
    except OSError:
        pass
    else:
        raise AssertionError("the flush should have failed")
    assert journal_files(first) == ["security.db.mfa-journal.1", "security.db.mfa-journal.2"]
    assert await first.mfa_advance("alice", "totp_step", 6)  # into journal 2
    second = await sqlite_stores()
    assert await second.mfa_get("alice", "totp_step") == "6"
    monkeypatch.undo()
    await first.flush()  # works again: both journals' changes committed, both removed
    assert journal_files(first) == ["security.db.mfa-journal.3"]


def restart_view(path: Path) -> dict[str, dict[str, str]]:
    """The MFA state a store opened on the files right now would hold, read without
    touching them: the table (a consistent WAL snapshot, whatever the worker thread is
    committing meanwhile), then the journals replayed over it."""
    view = SqliteStore(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        for user, field, value in db.execute("SELECT user, field, value FROM mfa"):
            view._mfa.setdefault(user, {})[field] = value
    view._replay_journals()
    return view._mfa


async def test_sqlite_journal_and_flushes_interleaved_lose_nothing(sqlite_stores):
    """Changes racing flushes (each flush yields to the loop while it commits): after
    every change, a restart at that moment would find exactly what the writer holds."""
    first: SqliteStore = await sqlite_stores(flush_interval=3600)
    mismatches = []

    async def writer(n: int) -> None:
        for i in range(80):
            await first.mfa_put(f"u{i % 5}", f"f{n}", str(i))
            if i % 3 == 0:
                await first.mfa_pop(f"u{(i + 1) % 5}", f"f{n}")
            if restart_view(first.path) != first._mfa:
                mismatches.append((n, i))
            await asyncio.sleep(0)

    async def flusher() -> None:
        for _ in range(40):
            await first.flush()
            await asyncio.sleep(0)

    await asyncio.gather(writer(1), writer(2), flusher(), flusher())
    assert not mismatches
    assert len(journal_files(first)) <= 2
    second = await sqlite_stores()
    assert {user: await second.mfa_fields(user) for user in await second.mfa_users()} == (
        first._mfa)


def test_sqlite_accepted_step_survives_sigkill(tmp_path):
    """A real process advances the TOTP step (flush an hour away), says so and is killed:
    the step it accepted is refused after the restart."""
    script = (
        "import asyncio, os, signal, sys\n"
        "from security.store.sqlite import SqliteStore\n"
        "async def main():\n"
        "    store = SqliteStore(sys.argv[1], flush_interval=3600)\n"
        "    await store.open()\n"
        "    assert await store.mfa_advance('alice', 'totp_step', 500)\n"
        "    await store.mfa_put('alice', 'totp', 'sealed')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    path = tmp_path / "security.db"
    proc = subprocess.run([sys.executable, "-c", script, str(path)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True)
    assert proc.returncode == -9, proc.stderr

    async def after() -> tuple[bool, bool, dict[str, str]]:
        store = SqliteStore(path, flush_interval=3600)
        await store.open()
        try:
            return (await store.mfa_advance("alice", "totp_step", 500),
                    await store.mfa_advance("alice", "totp_step", 501),
                    await store.mfa_fields("alice"))
        finally:
            await store.close()

    replayed, next_step, fields = asyncio.run(after())
    assert (replayed, next_step) == (False, True)
    assert fields == {"totp_step": "501", "totp": "sealed"}


async def test_sqlite_journal_lines_are_the_json_of_the_change(sqlite_stores):
    import json

    from security.store.sqlite import _compact

    first: SqliteStore = await sqlite_stores(flush_interval=3600)
    path = first._journal_path(first._journal_gen)
    users = ["alice", 'we"ird\\user', "jürgen\u2028@例え.jp", "tab\tnl\n\x00"]
    for user in users:
        await first.mfa_put(user, "totp", 'sealed "value" \u00e9')  # one field: the fast line
        await first.mfa_put(user, "rc:1", "1")
        assert await first.mfa_delete(user, "rc:") == 1  # a removed field: the general line
    lines = path.read_bytes().splitlines()
    expected = []
    for user in users:
        expected += [_compact([user, [["totp", 'sealed "value" \u00e9']]]),
                     _compact([user, [["rc:1", "1"]]]), _compact([user, [["rc:1", None]]])]
    assert [line.decode("ascii") for line in lines] == expected
    assert json.loads(lines[0]) == [users[0], [["totp", 'sealed "value" \u00e9']]]
    second = await sqlite_stores()
    for user in users:
        assert await second.mfa_fields(user) == {"totp": 'sealed "value" \u00e9'}
