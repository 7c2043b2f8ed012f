"""The embedded default store: the memory store, persisted to SQLite in the state dir.

Locks, bans, offence counts and records are written through before the call returns
(they are rare, and a restart must never forget them); failure counters are written
behind, every flush_interval, so no login decision waits for a disk write. All
SQLite work runs on one worker thread, in order. With WAL and synchronous=NORMAL a
killed process loses nothing that was written; a power cut can lose the last
flush interval of failure counters.

MFA state (the accepted TOTP step above all, which replay protection hangs on) is
written to an append-only journal before the call returns, and to SQLite behind,
every flush_interval: one `write()` of one line per change, on the caller's thread,
instead of a hop to the worker thread and a commit (~5 µs against ~130 µs of CPU).
Once the call returns, the line is in the OS page cache, so a SIGKILL or crash of
the process loses nothing: the next open replays the journal over the table. That is
the durability of a WAL commit with synchronous=NORMAL (no fsync either), so a power
cut can lose the last flush interval here too. Each flush starts a new journal file
(`<db>.mfa-journal.<n>`) and removes the older ones once their changes are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from security.blocklist import Entry
from security.private_files import make_private
from security.store import Lock, Record, StoreUnavailable
from security.store.memory import MemoryStore

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (key TEXT, pwhash TEXT, ts REAL, PRIMARY KEY (key, pwhash))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS bans (network TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offences (key TEXT PRIMARY KEY, count INTEGER, expires REAL);
CREATE TABLE IF NOT EXISTS mfa (user TEXT, field TEXT, value TEXT NOT NULL,
    PRIMARY KEY (user, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (kind TEXT, key TEXT, grp TEXT NOT NULL, expires REAL,
    data TEXT NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
"""
# Failure rows older than this are dropped at start-up: no window is longer.
MAX_FAILURE_AGE = 7 * 86400


# Keys snapshotted per slice of a flush before the event loop gets a turn (a slice is
# about 0.2 ms of the loop: requests in flight wait no longer than that).
FLUSH_SLICE = 250
JOURNAL = ".mfa-journal."  # <db name><JOURNAL><generation>
_compact = json.JSONEncoder(separators=(",", ":")).encode  # one line of ASCII JSON
_quote = json.encoder.encode_basestring_ascii  # a str as _compact writes it


class SqliteStore(MemoryStore):
    write_behind = True  # flush() drains `dirty` every flush_interval

    def __init__(self, path: str | Path, max_keys: int = 250_000, flush_interval: float = 1.0):
        super().__init__(max_keys=max_keys)
        self.path = Path(path)
        self.flush_interval = flush_interval
        self._db: sqlite3.Connection | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._flusher: asyncio.Task[None] | None = None
        self._moved: set[tuple[str, str]] = set()  # records whose expiry moved since a flush
        self._mfa_dirty: set[tuple[str, str]] = set()  # (user, field) journaled, not in SQLite
        self._journal_fd = -1
        # write-through changes a refusing disk did not take, oldest first (_write_through)
        self.unwritten: list[tuple[str, tuple[Any, ...]]] = []
        self._flush_failing = False
        self._journal_gen = 0
        self._journal_size = 0
        self._mfa_flush = asyncio.Lock()  # one journal rotation and commit at a time

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # --- lifecycle

    async def open(self) -> None:
        await self._run(self._open_db)
        self._flusher = asyncio.create_task(self._flush_forever(), name="sqlite-flush")

    def _open_db(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite gives its -wal and -shm files the database's mode
        for path in (self.path, *(Path(f"{self.path}{end}") for end in ("-wal", "-shm"))):
            if path == self.path or path.exists():
                make_private(path)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        now = time.time()
        db.execute("DELETE FROM failures WHERE ts < ?", (now - MAX_FAILURE_AGE,))
        for (data,) in db.execute("SELECT data FROM locks"):
            lock = Lock(**json.loads(data))
            self._locks[lock.key] = lock
        for (data,) in db.execute("SELECT data FROM bans"):
            ban = Entry(**json.loads(data))
            self._bans[ban.network] = ban
        for key, count, expires in db.execute("SELECT key, count, expires FROM offences"):
            self._offences[key] = (count, expires)
        for user, field, value in db.execute("SELECT user, field, value FROM mfa"):
            self._mfa.setdefault(user, {})[field] = value
        self._open_journal(self._replay_journals())
        db.execute("DELETE FROM records WHERE expires IS NOT NULL AND expires <= ?", (now,))
        for kind, key, group, expires, data in db.execute(
                "SELECT kind, key, grp, expires, data FROM records"):
            rec = Record(kind, key, json.loads(data), expires, group)
            self._records.setdefault(kind, {})[key] = rec
            if group:
                self._groups.setdefault((kind, group), set()).add(key)
        loaded: dict[str, dict[str, float]] = {}
        for key, pwhash, ts in db.execute("SELECT key, pwhash, ts FROM failures"):
            loaded.setdefault(key, {})[pwhash] = ts
        # least recently failed first, and never more than max_keys
        newest = sorted(loaded, key=lambda k: max(loaded[k].values()))[-self.max_keys:]
        for key in newest:
            self.load_failures(key, loaded[key])
        self._db = db

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self._db is not None:
            await self.flush()
            await self._run(self._db.close)
            self._db = None
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
        self._worker.shutdown(wait=True)

    # --- write-behind of failure counters

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except Exception:
                if not self._flush_failing:  # once an outage, not every second
                    log.exception("flushing to SQLite failed; retrying every %gs",
                                  self.flush_interval)
                self._flush_failing = True
            else:
                if self._flush_failing:
                    log.info("flushing to SQLite works again")
                self._flush_failing = False

    async def flush(self) -> None:
        """Writes the MFA changes, failure keys and record expiries since the last flush.

        The failure snapshot is taken on the event loop (the failure table is its alone) in
        slices of FLUSH_SLICE keys with a yield between them, so a large flush never stops
        the loop for long; a key changed after its slice is dirty again for the next flush.
        """
        if self.unwritten:
            waiting = list(self.unwritten)
            await self._run(self._write_changes, waiting)  # raises: they wait on, in order
            del self.unwritten[:len(waiting)]
            log.info("%d changes to locks and bans the disk had refused are written now",
                     len(waiting))
        if self._mfa_dirty:
            await self._flush_mfa()
        if self._moved:
            moved, self._moved = self._moved, set()
            moves = [(rec.expires, kind, key) for kind, key in moved
                     if (rec := self._records.get(kind, {}).get(key)) is not None]
            try:
                await self._run(self._execute_many,
                                "UPDATE records SET expires = ? WHERE kind = ? AND key = ?", moves)
            except BaseException:
                self._moved |= moved
                raise
        if not self.dirty:
            return
        keys, self.dirty = self.dirty, set()
        # flat (key, pwhash, ts, key, ...) parameters, made here: the worker thread holds
        # the GIL only to bind them, never for Python loops that would stall the loop
        values: list[str | float] = []
        try:
            snapshot, extend = self.snapshot_failures, values.extend
            for i, key in enumerate(keys, start=1):
                for pwhash, ts in snapshot(key):
                    extend((key, pwhash, ts))
                if i % FLUSH_SLICE == 0:
                    await asyncio.sleep(0)
            try:
                await self._run(self._write_failures, list(keys), values)
            except UnicodeEncodeError:  # one key would otherwise fail every flush from now on
                stored, values, dropped = _storable(keys, values)
                log.error("failure counters of %d keys are not UTF-8 text (a lone surrogate) "
                          "and stay in memory only", dropped)
                await self._run(self._write_failures, stored, values)
        except BaseException:  # cancelled too: the keys stay dirty for the final flush
            self.dirty |= keys
            raise

    def _write_failures(self, keys: list[str], values: list[str | float]) -> None:
        """Replaces the keys' rows, BATCH_ROWS rows per statement: each statement gives the
        GIL up once, for its step; executemany gives it up once a row, and each time the
        event loop's thread may keep it for up to sys.getswitchinterval() (5 ms), which
        made a flush of 2,000 keys cost the loop about 30 µs per request under load."""
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            _in_batches(self._db, "DELETE FROM failures WHERE key IN ({})", keys, 1)
            _in_batches(self._db, "INSERT INTO failures (key, pwhash, ts) VALUES {}", values, 3)

    # --- write-through of rare, important state

    def _execute(self, sql: str, args: tuple[Any, ...]) -> None:
        assert self._db is not None
        self._db.execute(sql, args)

    def _write_changes(self, changes: list[tuple[str, tuple[Any, ...]]]) -> None:
        assert self._db is not None
        with self._db:
            for sql, args in changes:
                self._execute(sql, args)

    async def _write_through(self, sql: str, args: tuple[Any, ...]) -> None:
        """Writes one change of the locks, offences or bans, which the memory part holds
        already. A disk that refuses it (read-only, full, failing) must not undo what the
        engine decided: a lock that could not be saved was never made, so a brute force
        went on while the disk was refusing. The change waits instead, after any others,
        for the next flush; `unwritten` holds them (the store's health check reports
        them). Waiting changes also put later ones behind them, so the file sees every
        change in its order."""
        if not self.unwritten:
            try:
                await self._run(self._execute, sql, args)
                return
            except sqlite3.Error as exc:  # OperationalError: disk I/O error, read-only, full
                log.error("SQLite refused a change to the locks or bans (%s); it is kept "
                          "in memory and written by the next flush that succeeds", exc)
        if len(self.unwritten) >= MAX_UNWRITTEN:
            raise StoreUnavailable(f"{len(self.unwritten)} changes already wait for the disk")
        self.unwritten.append((sql, args))

    async def _delete_expired(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Expired rows, deleted behind: one the disk refuses now goes at the next try (a
        reload skips expired ones anyway)."""
        try:
            await self._run(self._execute_many, sql, rows)
        except sqlite3.Error as exc:
            log.warning("SQLite refused to delete expired rows: %s", exc)

    async def put_lock(self, lock: Lock) -> None:
        await super().put_lock(lock)
        await self._write_through("INSERT OR REPLACE INTO locks (key, data) VALUES (?, ?)",
                                  (lock.key, json.dumps(lock.as_dict())))

    async def delete_lock(self, key: str) -> Lock | None:
        lock = await super().delete_lock(key)
        await self._write_through("DELETE FROM locks WHERE key = ?", (key,))
        return lock

    async def locks(self, now: float) -> list[Lock]:
        expired = [key for key, lock in self._locks.items() if lock.until <= now]
        current = await super().locks(now)
        if expired:
            await self._delete_expired("DELETE FROM locks WHERE key = ?",
                                       [(key,) for key in expired])
        return current

    async def bans(self, now: float) -> list[Entry]:
        expired = [net for net, ban in self._bans.items()
                   if ban.expires is not None and ban.expires <= now]
        current = await super().bans(now)
        if expired:
            await self._delete_expired("DELETE FROM bans WHERE network = ?",
                                       [(net,) for net in expired])
        return current

    async def refresh(self) -> None:
        await super().refresh()
        now = time.time()
        await self._delete_expired("DELETE FROM offences WHERE expires <= ?", [(now,)])
        await self._delete_expired("DELETE FROM records WHERE expires IS NOT NULL AND "
                                   "expires <= ?", [(now,)])

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        assert self._db is not None
        self._db.executemany(sql, rows)

    async def bump_offences(self, key: str, now: float, window: float) -> int:
        count = await super().bump_offences(key, now, window)
        await self._write_through(
            "INSERT OR REPLACE INTO offences (key, count, expires) VALUES (?, ?, ?)",
            (key, count, now + window))
        return count

    async def put_ban(self, ban: Entry) -> None:
        await super().put_ban(ban)
        await self._write_through("INSERT OR REPLACE INTO bans (network, data) VALUES (?, ?)",
                                  (ban.network, json.dumps(dataclasses.asdict(ban))))

    async def delete_ban(self, network: str) -> Entry | None:
        ban = await super().delete_ban(network)
        await self._write_through("DELETE FROM bans WHERE network = ?", (network,))
        return ban

    # --- MFA state: the memory store's answer, journaled before returning

    def _journal_path(self, gen: int) -> Path:
        return self.path.with_name(f"{self.path.name}{JOURNAL}{gen}")

    def _journals(self) -> list[tuple[int, Path]]:
        """The journal files on disk, oldest generation first."""
        found = []
        for path in self.path.parent.glob(f"{self.path.name}{JOURNAL}*"):
            gen = path.name.rpartition(".")[2]
            if gen.isdigit():
                found.append((int(gen), path))
        return sorted(found)

    def _replay_journals(self) -> int:
        """Applies the journals, in order, over the table just loaded; returns the
        generation the next journal takes.

        A line is one change, whole or not at all: a last line without its newline (cut
        by a crash) or one that does not parse is skipped. The replayed fields are dirty,
        so the next flush commits them and removes these files.
        """
        journals = self._journals()
        for _, path in journals:
            with path.open("rb") as fh:
                for raw in fh:
                    change = _journal_change(raw)
                    if change is None:
                        log.warning("skipping an unreadable MFA journal line",
                                    extra={"journal": str(path)})
                        continue
                    user, values = change
                    fields = self._mfa.setdefault(user, {})
                    for field, value in values:
                        if value is None:
                            fields.pop(field, None)
                        else:
                            fields[field] = value
                        self._mfa_dirty.add((user, field))
                    if not fields:
                        del self._mfa[user]
        return journals[-1][0] + 1 if journals else 1

    def _open_journal(self, gen: int) -> None:
        fd = os.open(self._journal_path(gen), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd, self._journal_gen = fd, gen
        self._journal_size = os.fstat(fd).st_size

    def _journal(self, user: str, fields: list[str]) -> None:
        """Journals the fields' current values (None: removed) as one line, on this thread.

        One write() of a whole line: once it returns the change survives a crash of this
        process. A write cut short (disk full) is cut off again and raises, so the journal
        never holds half a line before a whole one.
        """
        assert self._journal_fd >= 0, "the store is not open"
        current = self._mfa.get(user, {})
        if len(fields) == 1 and type(value := current.get(fields[0])) is str:
            # the common change (a step, a count), as _compact writes it without its layers
            line = f'[{_quote(user)},[[{_quote(fields[0])},{_quote(value)}]]]\n'.encode("ascii")
        else:
            line = (_compact([user, [[f, current.get(f)] for f in fields]]) + "\n"
                    ).encode("ascii")
        written = 0
        try:
            while written < len(line):
                written += os.write(self._journal_fd, line[written:])
        except OSError:
            os.truncate(self._journal_path(self._journal_gen), self._journal_size)
            raise
        self._journal_size += written
        for field in fields:
            self._mfa_dirty.add((user, field))

    async def _flush_mfa(self) -> None:
        """Commits the journaled fields to SQLite and removes the journals that held them.

        It first switches to a new journal: changes from then on go there and stay until
        the next flush; then it snapshots the fields (in slices, like the failure keys).
        """
        async with self._mfa_flush:
            dirty, self._mfa_dirty = self._mfa_dirty, set()
            if not dirty:
                return
            done = self._journal_gen
            self._open_journal(done + 1)
            rows: list[tuple[str, str, str]] = []
            gone: list[tuple[str, str]] = []
            try:
                # a value changed during a yield is newer than the switch: also fine, the
                # new journal holds that change too
                for i, (user, field) in enumerate(dirty, start=1):
                    value = self._mfa.get(user, {}).get(field)
                    if value is None:
                        gone.append((user, field))
                    else:
                        rows.append((user, field, value))
                    if i % FLUSH_SLICE == 0:
                        await asyncio.sleep(0)
                await self._run(self._write_mfa_rows, rows, gone)
            except BaseException:  # the journals stay; the fields go in the next flush
                self._mfa_dirty |= dirty
                raise
            for gen, path in self._journals():
                if gen <= done:
                    path.unlink(missing_ok=True)

    def _write_mfa_rows(self, rows: list[tuple[str, str, str]],
                        gone: list[tuple[str, str]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO mfa (user, field, value) VALUES (?, ?, ?)", rows)
            self._db.executemany("DELETE FROM mfa WHERE user = ? AND field = ?", gone)

    async def mfa_put(self, user: str, field: str, value: str) -> None:
        await super().mfa_put(user, field, value)
        self._journal(user, [field])

    async def mfa_pop(self, user: str, field: str) -> str | None:
        value = await super().mfa_pop(user, field)
        if value is not None:
            self._journal(user, [field])
        return value

    async def mfa_incr(self, user: str, field: str) -> int:
        value = await super().mfa_incr(user, field)
        self._journal(user, [field])
        return value

    async def mfa_advance(self, user: str, field: str, value: int) -> bool:
        advanced = self._mfa_advance(user, field, value)  # no second coroutine: a TOTP hot path
        if advanced:
            self._journal(user, [field])
        return advanced

    async def mfa_delete(self, user: str, prefix: str = "") -> int:
        names = [f for f in self._mfa.get(user, {}) if f.startswith(prefix)]
        count = await super().mfa_delete(user, prefix)
        if names:
            self._journal(user, names)
        return count
    # --- records: written through, except expiry moves (written behind)

    async def put_record(self, record: Record) -> None:
        await super().put_record(record)
        await self._run(self._execute,
                        "INSERT OR REPLACE INTO records (kind, key, grp, expires, data) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (record.kind, record.key, record.group, record.expires,
                         json.dumps(record.data)))

    async def delete_record(self, kind: str, key: str) -> Record | None:
        rec = await super().delete_record(kind, key)
        if rec is not None:
            await self._run(self._execute, "DELETE FROM records WHERE kind = ? AND key = ?",
                            (kind, key))
        return rec

    def moved(self, record: Record) -> None:
        self._moved.add((record.kind, record.key))

    def expire_records(self, now: float) -> list[Record]:
        gone = super().expire_records(now)
        self._moved -= {(rec.kind, rec.key) for rec in gone}
        return gone


BATCH_ROWS = 256  # rows per statement: 768 parameters, under SQLite's oldest limit (999)
MAX_UNWRITTEN = 100_000  # changes that may wait for a refusing disk; then StoreUnavailable


def _storable(keys: set[str], values: list[str | float]
              ) -> tuple[list[str], list[str | float], int]:
    """The keys and flat (key, pwhash, ts) rows without those holding a string SQLite
    cannot encode (strict_json keeps them out of the network front ends; a library caller
    could still pass one), and how many keys were left out."""
    def text(value: str | float) -> bool:
        try:
            str(value).encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    bad = {key for key in keys if not text(key)}
    bad.update(str(values[i]) for i in range(0, len(values), 3) if not text(values[i + 1]))
    rows = [values[i:i + 3] for i in range(0, len(values), 3) if values[i] not in bad]
    return [key for key in keys if key not in bad], [v for row in rows for v in row], len(bad)


def _in_batches(db: sqlite3.Connection, sql: str, params: list[Any], width: int) -> None:
    """Runs sql with its `{}` filled by one group of `width` placeholders per row, for the
    flat params: BATCH_ROWS rows at a time, then the rest in power-of-two batches (100
    rows: 64 + 32 + 4). So a statement has one of 9 sizes, and the connection's statement
    cache holds at most 9 per sql; a statement per remainder size filled it with ~6 MB."""
    group = "?" if width == 1 else "(" + ",".join("?" * width) + ")"
    start, rows = 0, len(params) // width
    while rows:
        size = BATCH_ROWS if rows >= BATCH_ROWS else 1 << (rows.bit_length() - 1)
        end = start + size * width
        db.execute(sql.format(",".join([group] * size)), params[start:end])
        start, rows = end, rows - size


def _journal_change(raw: bytes) -> tuple[str, list[tuple[str, str | None]]] | None:
    """(user, [(field, value or None), ...]) of a journal line, or None if it is no whole,
    well-formed line."""
    if not raw.endswith(b"\n"):
        return None
    try:
        user, values = json.loads(raw)
        changes = [(field, value) for field, value in values]
    except (ValueError, TypeError):
        return None
    if not isinstance(user, str) or not all(
            isinstance(f, str) and (v is None or isinstance(v, str)) for f, v in changes):
        return None
    return user, changes
