"""Audit log of the security engine: an append-only, hash-chained JSON-lines file.

Every security state change (lock, unlock, ban, unban, key and MFA changes,
config reloads) and, per `AuditPolicy`, every login is one record. This is
the place where account names and IPs go (never metric labels).

Format: `<dir>/audit.log`, one record per line, each line the canonical JSON
(`sort_keys=True, separators=(",", ":")`, ASCII) of

    {"seq": 7, "time": 1700000000.5, "type": "lockout.lock", "actor": "engine",
     "subject": "alice@example.org", "details": {...}, "prev": "<hex>", "hash": "<hex>"}

`hash` is SHA-256 over the canonical JSON of the record without `hash`; `prev`
is the previous record's `hash` (64 zeros before the first record). After a
purge the first line is an anchor record (`type: "audit.anchor"`) whose `seq`
and `prev` are the seq and hash of the last purged record; the first kept
record links to it through its unchanged `prev`. Kept records are copied byte
for byte, so their hashes never change.

Durability: each record is one `write()` on an unbuffered O_APPEND file, so
once `record()` returns the line is in the OS page cache and survives a
SIGKILL or crash of this process. `fsync` runs every `fsync_every` records or
`fsync_interval` seconds (checked at the next write; call `sync()` from a
timer to bound it) and on `close()`, so only a machine crash or power loss can
lose the last unsynced records. Such a crash can leave a torn last line: on
open it is moved to `<file>.torn` and the chain continues from the last
complete record; `verify_file()` on the raw file reports it as `torn`.

One writer per file: a `flock` on `<file>.lock` keeps a second process (or a
second `AuditLog` in this one) from forking the chain.

What the chain proves: any edit, deletion, reordering or insertion inside the
file breaks it, unless the editor recomputes every later hash. A chain has no
secret, so someone with write access can rewrite it entirely, and cutting off
the tail leaves a valid shorter chain. Ship the sink lines off the host to get
an outside witness; `AuditLog.verify()` also checks the file against the head
it holds in memory, which catches a cut tail while the process runs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

GENESIS = "0" * 64
ANCHOR_TYPE = "audit.anchor"
FIELDS = frozenset({"seq", "time", "type", "actor", "subject", "details", "prev", "hash"})
MAX_QUERY_LIMIT = 1000

_TYPE_RE = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

# Which AuditPolicy flag decides a type; exact types first, then the part before the dot.
_FLAG_BY_TYPE = {
    "auth.success": "log_successful_auth",
    "auth.failure": "log_failed_auth",
    "mfa.verify.success": "log_successful_auth",
    "mfa.verify.failure": "log_failed_auth",
}
_FLAG_BY_FAMILY = {
    "config": "log_config_changes",
    "privilege": "log_privilege_escalation",
    "apikey": "log_privilege_escalation",
    "mfa": "log_privilege_escalation",
    "data": "log_data_access",
}

Sink = Callable[[str], object] | IO[str]


@dataclass(frozen=True)
class AuditPolicy:
    """The seed's AuditConfig; `retention_seconds` <= 0 keeps records forever."""

    enabled: bool = True
    log_successful_auth: bool = True
    log_failed_auth: bool = True
    log_privilege_escalation: bool = True
    log_data_access: bool = False
    log_config_changes: bool = True
    retention_seconds: float = 90 * 24 * 3600

    def wants(self, type: str) -> bool:
        """Whether a record of this type is written.

        lockout.*, blocklist.* and types no flag covers are always written when
        enabled: an audit log should rather hold too much than miss a change.
        """
        if not self.enabled:
            return False
        flag = _FLAG_BY_TYPE.get(type) or _FLAG_BY_FAMILY.get(type.split(".", 1)[0])
        return True if flag is None else bool(getattr(self, flag))


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of walking the chain.

    `count` records verified (the anchor is not counted); `last_seq`/`last_hash`
    are the head of the verified part (the hash the next record must carry in
    `prev`). On failure, `broken_seq` is the first seq that does not verify
    (None when line 1 is unreadable, so no seq can be named), `broken_line` its
    1-based line, and `reason` one of: torn (incomplete last line), unparseable,
    malformed (self-consistent record with wrong fields), content_edited,
    hash_edited, hash_mismatch (content or hash edited, cannot tell which),
    not_canonical (bytes differ from what the writer wrote), misplaced_anchor,
    deleted, reordered, bad_link (`prev` is not the previous hash), truncated
    and diverged (file ends before, or differs from, the head the writer holds).
    """

    ok: bool
    count: int
    first_seq: int | None
    last_seq: int
    last_hash: str
    broken_seq: int | None = None
    broken_line: int | None = None
    reason: str = ""
    detail: str = ""

    def __str__(self) -> str:
        if self.ok:
            span = f"seq {self.first_seq}..{self.last_seq}" if self.count else "no records"
            return f"OK: {self.count} records verified ({span}), head {self.last_hash}"
        where = "unknown seq" if self.broken_seq is None else f"seq {self.broken_seq}"
        return (f"BROKEN at {where} (line {self.broken_line}): {self.reason}: {self.detail}; "
                f"{self.count} records verified before it")


def _canonical(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(record: dict[str, Any]) -> str:
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(_canonical(body).encode("ascii")).hexdigest()


def _seal(record: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Adds `hash`; returns the record and its line as written to the file."""
    record["hash"] = _digest(record)
    return record, (_canonical(record) + "\n").encode("ascii")


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:  # includes UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _well_formed(rec: dict[str, Any]) -> bool:
    return (set(rec) == FIELDS and _is_int(rec["seq"]) and _is_number(rec["time"])
            and all(isinstance(rec[k], str) for k in ("type", "actor", "subject", "prev", "hash"))
            and isinstance(rec["details"], dict))


def _lines(fh: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line with its newline if any)."""
    offset = 0
    for number, raw in enumerate(fh, start=1):
        yield number, offset, raw
        offset += len(raw)


def _seq_later(path: Path, offset: int, seq: int) -> bool:
    """Whether a record with this seq appears at or after `offset` (reorder vs delete)."""
    with path.open("rb") as fh:
        fh.seek(offset)
        return any((rec := _parse(raw)) is not None and rec.get("seq") == seq for raw in fh)


def _hash_break(rec: dict[str, Any], computed: str, following: bytes | None) -> str:
    """Tells an edited body from an edited hash by what the next record links to."""
    stored = rec["hash"]
    nxt = _parse(following) if following is not None else None
    next_prev = nxt.get("prev") if nxt is not None else None
    if not _HEX64_RE.fullmatch(stored) or next_prev == computed:
        return "hash_edited"
    if next_prev == stored:
        return "content_edited"
    return "hash_mismatch"


def verify_file(path: str | os.PathLike[str],
                expect_last: tuple[int, str] | None = None) -> VerifyResult:
    """Walks the chain of an audit file and reports the first broken link.

    `expect_last` is a head (seq, hash) known from elsewhere (the writer's
    memory, a shipped copy); a file that ends before it is reported truncated.
    Raises OSError if the file cannot be read.
    """
    path = Path(path)
    count, first_seq, seq, prev, number = 0, None, 0, GENESIS, 0

    def broken(number: int, at: int | None, reason: str, detail: str) -> VerifyResult:
        return VerifyResult(False, count, first_seq, seq, prev, at, number, reason, detail)

    with path.open("rb") as fh:
        lines = _lines(fh)
        current = next(lines, None)
        while current is not None:
            following = next(lines, None)
            number, offset, raw = current
            current = following
            expected: int | None = seq + 1
            if not raw.endswith(b"\n"):
                return broken(number, expected if number > 1 else None, "torn",
                              f"last line is incomplete ({len(raw)} bytes, no newline)")
            rec = _parse(raw)
            if rec is None or not isinstance(rec.get("hash"), str):
                return broken(number, expected if number > 1 else None, "unparseable",
                              "line is not a JSON record")
            if number == 1:  # no seq is known yet: name the one the line claims
                expected = rec["seq"] if _is_int(rec.get("seq")) else None
            computed = _digest(rec)
            if computed != rec["hash"]:
                reason = _hash_break(rec, computed, following[2] if following else None)
                return broken(number, expected, reason, "hash does not match the record")
            if not _well_formed(rec):
                return broken(number, expected, "malformed", "fields are missing or mistyped")
            if _canonical(rec).encode("ascii") + b"\n" != raw:
                return broken(number, expected, "not_canonical",
                              "bytes differ from the canonical form")
            if rec["type"] == ANCHOR_TYPE:
                if number != 1:
                    return broken(number, expected, "misplaced_anchor",
                                  "an anchor may only be the first line")
                seq, prev = rec["seq"], rec["prev"]
                continue
            want = seq + 1  # 1 on the first line of a log that never was purged
            if rec["seq"] != want:
                later = rec["seq"] > want and _seq_later(path, offset + len(raw), want)
                reason = "deleted" if rec["seq"] > want and not later else "reordered"
                return broken(number, want, reason, f"found seq {rec['seq']} where {want} belongs")
            if rec["prev"] != prev:
                return broken(number, want, "bad_link",
                              "prev is not the hash of the record before")
            count += 1
            first_seq = rec["seq"] if first_seq is None else first_seq
            seq, prev = rec["seq"], rec["hash"]
    if expect_last is not None and expect_last != (seq, prev):
        end = number + 1
        if expect_last[0] > seq:
            return broken(end, seq + 1, "truncated",
                          f"file ends at seq {seq}, the writer is at {expect_last[0]}")
        return broken(end, seq, "diverged",
                      f"file head ({seq}) differs from the writer's ({expect_last[0]})")
    return VerifyResult(True, count, first_seq, seq, prev)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLogLocked(RuntimeError):
    """Another AuditLog (this or another process) already writes this file."""


class AuditLog:
    """The writer, reader and purger of one audit file. Thread-safe; calls are short."""

    def __init__(self, directory: str | os.PathLike[str], policy: AuditPolicy | None = None, *,
                 filename: str = "audit.log", sink: Sink | None = None,
                 fsync_every: int = 100, fsync_interval: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy or AuditPolicy()
        self.path = Path(directory) / filename
        self.counts_by_type: dict[str, int] = {}
        self.last_verify_ok: bool | None = None
        self.sink_errors = 0
        self.torn_bytes_recovered = 0
        self._sink = sink
        self._fsync_every = max(1, fsync_every)
        self._fsync_interval = fsync_interval
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(f"{self.path}.lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise AuditLogLocked(f"{self.path} is in use by another writer") from exc
        created = not self.path.exists()
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held until close()
        if created:
            _fsync_dir(self.path.parent)
        self._recover_torn_tail()
        self._load()
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._closed = False

    def _recover_torn_tail(self) -> None:
        """Moves bytes after the last newline (a write cut by a crash) to `<file>.torn`."""
        with self.path.open("rb") as fh:
            data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return
        torn = Path(f"{self.path}.torn")
        with torn.open("ab") as out:
            out.write(data[keep:] + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.truncate(self.path, keep)
        os.fsync(self._fh.fileno())
        self.torn_bytes_recovered = len(data) - keep
        log.warning("audit log %s: moved a torn last line (%d bytes) to %s",
                    self.path, self.torn_bytes_recovered, torn)

    def _load(self) -> None:
        """Indexes offsets, seqs and times, and finds the head to continue the chain from."""
        self._offsets, self._seqs, self._times = array("q"), array("q"), array("d")
        self._last_seq, self._last_hash = 0, GENESIS
        self._anchor: dict[str, Any] | None = None
        size = 0
        with self.path.open("rb") as fh:
            for _, offset, raw in _lines(fh):
                size = offset + len(raw)
                rec = _parse(raw)
                if rec is None or not _is_int(rec.get("seq")) or not isinstance(
                        rec.get("hash"), str) or not isinstance(rec.get("prev"), str):
                    log.error("audit log %s: unreadable record at byte %d", self.path, offset)
                    continue
                if rec.get("type") == ANCHOR_TYPE and offset == 0:
                    self._anchor = rec
                    self._last_seq, self._last_hash = rec["seq"], rec["prev"]
                    continue
                self._offsets.append(offset)
                self._seqs.append(rec["seq"])
                self._times.append(float(rec["time"]) if _is_number(rec.get("time")) else 0.0)
                self._last_seq, self._last_hash = rec["seq"], rec["hash"]
        self._size = size

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_hash(self) -> str:
        return self._last_hash

    def record(self, type: str, actor: str, subject: str,
               details: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Appends one record; returns it, or None when the policy skips the type.

        `details` is normalised through JSON (non-JSON values become strings) so the
        returned record equals what a reader gets back. OSError (disk full) propagates
        after the partial line, if any, is cut off again.
        """
        if not _TYPE_RE.fullmatch(type) or type == ANCHOR_TYPE:
            raise ValueError(f"bad audit record type {type!r}")
        if not self.policy.wants(type):
            return None
        body = json.loads(json.dumps(details or {}, default=str, allow_nan=False))
        with self._lock:
            if self._closed:
                raise ValueError("audit log is closed")
            rec, line = _seal({"seq": self._last_seq + 1, "time": float(self._clock()),
                               "type": type, "actor": str(actor), "subject": str(subject),
                               "details": body, "prev": self._last_hash})
            self._append(rec, line)
        return dict(rec)

    def _append(self, rec: dict[str, Any], line: bytes) -> None:
        offset = self._size
        try:
            written = 0
            while written < len(line):
                written += self._fh.write(line[written:]) or 0
        except OSError:
            os.truncate(self.path, offset)
            raise
        self._size += len(line)
        self._offsets.append(offset)
        self._seqs.append(rec["seq"])
        self._times.append(rec["time"])
        self._last_seq, self._last_hash = rec["seq"], rec["hash"]
        self.counts_by_type[rec["type"]] = self.counts_by_type.get(rec["type"], 0) + 1
        self._unsynced += 1
        if (self._unsynced >= self._fsync_every
                or time.monotonic() - self._last_sync >= self._fsync_interval):
            self._sync()
        self._emit(line.decode("ascii").rstrip("\n"))

    def _emit(self, line: str) -> None:
        """Copies a line to the extra sink; a failing sink never fails the record."""
        if self._sink is None:
            return
        try:
            if callable(self._sink):
                self._sink(line)
            else:
                self._sink.write(line + "\n")
                self._sink.flush()
        except Exception as exc:  # a shipper's problem must not stop auditing
            self.sink_errors += 1
            log.warning("audit sink failed: %s", exc)

    def _sync(self) -> None:
        os.fsync(self._fh.fileno())
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def sync(self) -> None:
        """Forces written records to disk (for a periodic timer)."""
        with self._lock:
            if not self._closed and self._unsynced:
                self._sync()

    def close(self) -> None:
        """Syncs and releases the file and the writer lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sync()
            self._fh.close()
            self._lockfile.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self) -> VerifyResult:
        """Verifies the file, also against the head held in memory (catches a cut tail)."""
        with self._lock:
            result = verify_file(self.path, expect_last=(self._last_seq, self._last_hash))
            self.last_verify_ok = result.ok
        if not result.ok:
            log.error("audit log %s: %s", self.path, result)
        return result

    def query(self, start: float | None = None, end: float | None = None,
              types: list[str] | None = None, actor: str | None = None,
              subject: str | None = None, limit: int = 100,
              cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Records newest first with start <= time < end, and the cursor of the next page.

        `types` holds exact types or prefixes ending in "." ("lockout."). The cursor
        is opaque to callers (it is the seq to continue below); None means no more.
        """
        limit = max(1, min(int(limit), MAX_QUERY_LIMIT))
        below: int | None = None
        if cursor is not None:
            if not cursor.isdigit():
                raise ValueError(f"bad cursor {cursor!r}")
            below = int(cursor)
        exact = {t for t in types or () if not t.endswith(".")}
        prefixes = tuple(t for t in types or () if t.endswith("."))
        found: list[dict[str, Any]] = []
        with self._lock, self.path.open("rb") as fh:
            top = len(self._seqs) if below is None else bisect_left(self._seqs, below)
            for i in range(top - 1, -1, -1):
                when = self._times[i]
                if (start is not None and when < start) or (end is not None and when >= end):
                    continue
                fh.seek(self._offsets[i])
                rec = _parse(fh.readline())
                if (rec is None or (types and rec.get("type") not in exact
                                    and not str(rec.get("type")).startswith(prefixes))
                        or (actor is not None and rec.get("actor") != actor)
                        or (subject is not None and rec.get("subject") != subject)):
                    continue
                found.append(rec)
                if len(found) > limit:
                    return found[:limit], str(found[limit - 1]["seq"])
        return found, None

    def purge(self, now: float | None = None) -> int:
        """Drops records older than the retention; returns how many were dropped.

        Only a prefix goes (up to the first record inside the retention), replaced
        by an anchor so the rest still verifies. A log that does not verify is left
        alone: purging would destroy the evidence.
        """
        retention = self.policy.retention_seconds
        if retention <= 0:
            return 0
        cutoff = (self._clock() if now is None else now) - retention
        result = self.verify()
        if not result.ok:
            log.error("audit log %s: not purging a log that fails verification", self.path)
            return 0
        with self._lock:
            if self._closed:
                raise ValueError("audit log is closed")
            n = 0
            while n < len(self._times) and self._times[n] < cutoff:
                n += 1
            if n == 0:
                return 0
            with self.path.open("rb") as fh:
                fh.seek(self._offsets[n - 1])
                last = json.loads(fh.readline())
            purged_before = self._anchor["details"].get("purged_total", 0) if self._anchor else 0
            anchor, line = _seal({
                "seq": last["seq"], "time": float(self._clock()), "type": ANCHOR_TYPE,
                "actor": "engine", "subject": "",
                "details": {"purged": n, "purged_total": purged_before + n, "cutoff": cutoff,
                            "last_purged_seq": last["seq"], "last_purged_hash": last["hash"]},
                "prev": last["hash"]})
            keep_from = self._offsets[n] if n < len(self._offsets) else self._size
            tmp = Path(f"{self.path}.tmp")
            with tmp.open("wb") as out, self.path.open("rb") as src:
                out.write(line)
                src.seek(keep_from)
                shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
            self._fh.close()
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held until close()
            shift = keep_from - len(line)
            self._offsets = array("q", (offset - shift for offset in self._offsets[n:]))
            self._seqs = self._seqs[n:]
            self._times = self._times[n:]
            self._size -= shift
            self._anchor = anchor
            self._unsynced = 0
            self.counts_by_type[ANCHOR_TYPE] = self.counts_by_type.get(ANCHOR_TYPE, 0) + 1
            self._emit(line.decode("ascii").rstrip("\n"))
        log.info("audit log %s: purged %d records older than %s", self.path, n, cutoff)
        return n
