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
SIGKILL or crash of this process. `fsync` runs every `fsync_interval` seconds
(checked at the next write; call `sync()` from a timer to bound it), also every
`fsync_every` records when that is set, and on `close()`, so only a machine crash
or power loss can lose the last unsynced records. By time alone is the default,
Redis's `appendfsync everysec`: an fsync costs about 0.5 ms of CPU, so syncing every
100 records added 4-10 µs to each record at thousands of logins a second. The fsync
a write triggers runs on a background thread, never in the caller's: `record()` is
called on the event loop that answers logins, and an fsync takes milliseconds. Such a crash can
leave a torn last line: on open it is moved to `<file>.torn` and the chain
continues from the last complete record; `verify_file()` on the raw file
reports it as `torn`.

Index: `query()` and `purge()` find records through an in-memory index of
blocks of consecutive records (byte offset and seq of the first, the range of
their times, how many). It holds at most `index_blocks` blocks: when full,
neighbouring blocks merge and a block holds twice as many records, so the
index stays within about 1.3 MB however long the retention, and a query reads at
most a block's worth of lines beyond what it returns. `verify()`, `query()`
and `purge()` read the file without holding the lock `record()` takes, so a
long verification never holds up a login.

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
import itertools
import json
import logging
import math
import operator
import os
import re
import sys
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from security.private_files import SHARED_WITH_GROUP, make_private, private_opener

log = logging.getLogger(__name__)

GENESIS = "0" * 64
ANCHOR_TYPE = "audit.anchor"
FIELDS = frozenset({"seq", "time", "type", "actor", "subject", "details", "prev", "hash"})
MAX_QUERY_LIMIT = 1000
# At most this many index blocks (40 bytes each): about 1.3 MB of index at the most
# (it swings between half and all of that as blocks merge). 1 << 17 let the index
# alone move RSS by 2.6 MB in the long load test, most of its 5 % limit.
INDEX_BLOCKS = 1 << 15

_TYPE_RE = re.compile(r"[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*")
# Types that passed _TYPE_RE (so it runs once per type), with their JSON text.
_GOOD_TYPES: dict[str, str] = {}
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


_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
# The C encoder JSONEncoder.encode builds anew on every call, built once. Without the
# circular-reference check: every value it meets is acyclic (details went through a JSON
# round trip or are flat; records come from the file), where a cycle would only raise
# RecursionError instead of ValueError.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_chunks = _make_encoder(None, _ENCODER.default, _quote, None, ":", ",", True, False,
                               False) if _make_encoder is not None else None


def _canonical(value: Any) -> str:
    """json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)."""
    if _encode_chunks is None or isinstance(value, str):
        return _ENCODER.encode(value)
    return "".join(_encode_chunks(value, 0))


# Detail values whose JSON round trip gives back the same value of the same type.
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def _digest(record: dict[str, Any]) -> str:
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(_canonical(body).encode("ascii")).hexdigest()


def _seal(record: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """Adds `hash`; returns the record and its line as written to the file."""
    record["hash"] = _digest(record)
    return record, (_canonical(record) + "\n").encode("ascii")


def _normalised(details: dict[str, Any] | None) -> dict[str, Any]:
    """Details as a reader gets them back (through JSON: non-JSON values become strings).

    Flat details of plain values (the engine's) come back unchanged, so they skip the
    round trip; a copy still keeps the record apart from the caller's dict.
    """
    if not details:
        return {}
    for key, value in details.items():  # a loop: issuperset() would build a set first
        if type(key) is not str or type(value) not in _PLAIN_TYPES:
            body: dict[str, Any] = json.loads(json.dumps(details, default=str,
                                                         allow_nan=False))
            return body
    return dict(details)


# The canonical JSON of flat details of plain values, by their items and the items'
# types (True == 1 as keys): the engine's and the MFA manager's details come in a handful
# of shapes ({"protocol": "imap"}, a verification's method, reason and drift), so their
# text is looked up (about a tenth of encoding it). No floats: -0.0 == 0.0 would share
# a text. Cleared when full, so varying details (lock times) cost a miss, never memory.
_DETAILS_TEXT: dict[tuple[tuple[Any, ...], tuple[type, ...]], str] = {}
_DETAILS_TEXT_MAX = 4096
_TEXT_CACHED_TYPES = frozenset({str, int, bool, type(None)})


def _details_json(details: dict[str, Any] | None) -> str:
    """_canonical(_normalised(details)), from the cache when the details are flat."""
    if not details:
        return "{}"
    try:
        key = (tuple(details.items()), tuple(map(type, details.values())))
        text = _DETAILS_TEXT.get(key)
    except TypeError:  # an unhashable value (a list, a dict): encoded every time
        return _canonical(_normalised(details))
    if text is None:
        text = _canonical(_normalised(details))
        if _TEXT_CACHED_TYPES.issuperset(key[1]) and all(type(k) is str for k in details):
            if len(_DETAILS_TEXT) >= _DETAILS_TEXT_MAX:
                _DETAILS_TEXT.clear()
            _DETAILS_TEXT[key] = text
    return text


def _record_text(seq: int, when: float, type_json: str, actor: str, subject: str,
                 details_json: str, prev_json: str) -> tuple[str, bytes]:
    """(hash, line with its newline) of a record: the canonical JSON built once.

    The same text _canonical(record) gives, field by field in sorted key order (actor,
    details, hash, prev, seq, subject, time, type); the hash covers it without `hash`.
    `type_json` and `prev_json` are the type and the previous hash already quoted as JSON.
    """
    if not math.isfinite(when):
        raise ValueError("Out of range float values are not JSON compliant")
    head = f'{{"actor":{_quote(actor)},"details":{details_json}'.encode("ascii")
    tail = (f',"prev":{prev_json},"seq":{int.__repr__(seq)},"subject":{_quote(subject)}'
            f',"time":{float.__repr__(when)},"type":{type_json}}}').encode("ascii")
    hashed = _sha256(head)
    hashed.update(tail)
    digest = hashed.hexdigest()
    return digest, b"".join((head, b',"hash":"', digest.encode("ascii"), b'"', tail, b"\n"))


_sha256 = hashlib.sha256


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


def _indexed(rec: dict[str, Any] | None) -> bool:
    """Whether a parsed line is a record the index holds (what _load indexes)."""
    return (rec is not None and _is_int(rec.get("seq")) and isinstance(rec.get("hash"), str)
            and isinstance(rec.get("prev"), str))


def _time_of(rec: dict[str, Any]) -> float:
    return float(rec["time"]) if _is_number(rec.get("time")) else 0.0


def _lines(fh: IO[bytes], limit: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line with its newline if any), up to byte `limit`.

    `limit` is where the writer's last complete record ended when the reader started:
    lines appended meanwhile are not read.
    """
    offset = 0
    for number, raw in enumerate(fh, start=1):
        if limit is not None and offset >= limit:
            return
        yield number, offset, raw
        offset += len(raw)


def _seq_in(lines: Iterable[bytes], seq: int) -> bool:
    """Whether a record with this seq is among these lines (reorder vs delete)."""
    return any((rec := _parse(raw)) is not None and rec.get("seq") == seq for raw in lines)


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
    with Path(path).open("rb") as fh:
        return _verify(fh, expect_last)


def _verify(fh: IO[bytes], expect_last: tuple[int, str] | None,
            limit: int | None = None) -> VerifyResult:
    """verify_file on an open file, reading no further than byte `limit`."""
    count, first_seq, seq, prev, number = 0, None, 0, GENESIS, 0

    def broken(number: int, at: int | None, reason: str, detail: str) -> VerifyResult:
        return VerifyResult(False, count, first_seq, seq, prev, at, number, reason, detail)

    lines = _lines(fh, limit)
    current = next(lines, None)
    while current is not None:
        following = next(lines, None)
        number, _, raw = current
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
            rest = itertools.chain([following[2]] if following else [],
                                   (line for _, _, line in lines))
            later = rec["seq"] > want and _seq_in(rest, want)
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


class _Index:
    """Blocks of consecutive records: first byte offset, first seq, min and max time, count.

    Records are added in file order. Arrays are only appended to in place (the last
    block grows, or a block is added); merging and trimming build new arrays, so a
    reader holding the old ones (taken under the log's lock) keeps a consistent view.
    """

    def __init__(self, max_blocks: int = INDEX_BLOCKS) -> None:
        self.max_blocks = max(2, max_blocks)
        self.stride = 1  # records per full block
        self.offsets, self.seqs, self.counts = array("q"), array("q"), array("q")
        self.tmin, self.tmax = array("d"), array("d")

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, seq: int, when: float) -> None:
        counts = self.counts
        if counts and counts[-1] < self.stride:
            counts[-1] += 1
            if when < self.tmin[-1]:
                self.tmin[-1] = when
            if when > self.tmax[-1]:
                self.tmax[-1] = when
            return
        if len(counts) >= self.max_blocks:
            self._merge_pairs()
            self.add(offset, seq, when)
            return
        self.offsets.append(offset)
        self.seqs.append(seq)
        counts.append(1)
        self.tmin.append(when)
        self.tmax.append(when)

    def _merge_pairs(self) -> None:
        """Halves the blocks: each pair of neighbours becomes one, and the stride doubles."""
        odd = len(self.counts) % 2

        def pairs(values: array[Any], typecode: str, combine: Callable[[Any, Any], Any]
                  ) -> array[Any]:
            merged = array(typecode, map(combine, values[0::2], values[1::2]))
            return merged + values[-1:] if odd else merged

        self.counts = pairs(self.counts, "q", operator.add)
        self.tmin = pairs(self.tmin, "d", min)
        self.tmax = pairs(self.tmax, "d", max)
        self.offsets, self.seqs = self.offsets[0::2], self.seqs[0::2]
        self.stride *= 2

    def drop_front(self, n: int, keep_from: int, first_seq: int, shift: int) -> None:
        """Forgets the first n records (the kept ones start at byte keep_from with
        first_seq) and moves every offset `shift` bytes down (the file was rewritten)."""
        if n <= 0:
            return
        b = bisect_right(self.offsets, keep_from) - 1
        dropped = sum(self.counts[:b])
        counts = self.counts[b:]
        offsets, seqs = self.offsets[b:], self.seqs[b:]
        tmin, tmax = self.tmin[b:], self.tmax[b:]
        if counts:
            counts[0] -= n - dropped
            offsets[0], seqs[0] = keep_from, first_seq  # its times stay bounds of what is left
            if counts[0] == 0:
                counts, offsets, seqs = counts[1:], offsets[1:], seqs[1:]
                tmin, tmax = tmin[1:], tmax[1:]
        self.offsets = array("q", (offset - shift for offset in offsets))
        self.seqs, self.counts, self.tmin, self.tmax = seqs, counts, tmin, tmax


class AuditLog:
    """The writer, reader and purger of one audit file. Thread-safe; calls are short.

    Locks: `_lock` guards the chain head, the index and appends (record() holds it for
    a write); `_fd_lock` keeps the file handle from being closed or swapped while an
    fsync runs on it; `_purge_lock` lets one purge run at a time. Taken in the order
    _purge_lock, _fd_lock, _lock.
    """

    def __init__(self, directory: str | os.PathLike[str], policy: AuditPolicy | None = None, *,
                 filename: str = "audit.log", sink: Sink | None = None,
                 fsync_every: int = 0, fsync_interval: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 index_blocks: int = INDEX_BLOCKS) -> None:
        self.policy = policy or AuditPolicy()
        self.path = Path(directory) / filename
        self.counts_by_type: dict[str, int] = {}
        self.last_verify_ok: bool | None = None
        self.sink_errors = 0
        self.sync_errors = 0
        self.torn_bytes_recovered = 0
        self._sink = sink
        # 0: by time only (every fsync_interval, like Redis's appendfsync everysec); a
        # count as well bounds what a power cut loses at high rates, at ~0.5 ms CPU a sync
        self._fsync_every = fsync_every if fsync_every > 0 else sys.maxsize
        self.fsync_interval = fsync_interval
        self._clock = clock
        self._index_blocks = index_blocks
        self._lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._purge_lock = threading.Lock()
        self._sync_pending = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(f"{self.path}.lock", "a",  # noqa: SIM115 - held until close()
                              opener=private_opener)
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise AuditLogLocked(f"{self.path} is in use by another writer") from exc
        created = not self.path.exists()
        make_private(self.path, SHARED_WITH_GROUP)  # it names accounts and addresses
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held until close()
        if created:
            _fsync_dir(self.path.parent)
        self._recover_torn_tail()
        self._load()
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._closed = False

    def _recover_torn_tail(self, chunk: int = 1 << 16) -> None:
        """Moves bytes after the last newline (a write cut by a crash) to `<file>.torn`."""
        with self.path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            end, tail = size, b""
            while end > 0 and b"\n" not in tail:  # read backwards, never the whole file
                start = max(0, end - chunk)
                fh.seek(start)
                tail = fh.read(end - start) + tail
                end = start
        keep = end + tail.rfind(b"\n") + 1
        if keep == size:
            return
        torn = Path(f"{self.path}.torn")
        with open(torn, "ab", opener=private_opener) as out:
            out.write(tail[keep - end:] + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.truncate(self.path, keep)
        os.fsync(self._fh.fileno())
        self.torn_bytes_recovered = size - keep
        log.warning("audit log %s: moved a torn last line (%d bytes) to %s",
                    self.path, self.torn_bytes_recovered, torn)

    def _load(self) -> None:
        """Indexes the records and finds the head to continue the chain from."""
        self._index = _Index(self._index_blocks)
        self._last_seq, self._last_hash = 0, GENESIS
        self._anchor: dict[str, Any] | None = None
        size = 0
        with self.path.open("rb") as fh:
            for _, offset, raw in _lines(fh):
                size = offset + len(raw)
                rec = _parse(raw)
                if not _indexed(rec):
                    log.error("audit log %s: unreadable record at byte %d", self.path, offset)
                    continue
                assert rec is not None
                if rec.get("type") == ANCHOR_TYPE and offset == 0:
                    self._anchor = rec
                    self._last_seq, self._last_hash = rec["seq"], rec["prev"]
                    continue
                self._index.add(offset, rec["seq"], _time_of(rec))
                self._last_seq, self._last_hash = rec["seq"], rec["hash"]
        self._size = size
        self._prev_json = _quote(self._last_hash)  # a file's hash may be anything

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
        written = self._write(type, actor, subject, details)
        if written is None:
            return None
        seq, when, prev, digest = written
        return {"seq": seq, "time": when, "type": type, "actor": str(actor),
                "subject": str(subject), "details": _normalised(details), "prev": prev,
                "hash": digest}

    def append(self, type: str, actor: str, subject: str,
               details: dict[str, Any] | None = None) -> bool:
        """record() without building the record it returns, for callers that only need
        it written (the engine's, one per login); False when the policy skips the type."""
        return self._write(type, actor, subject, details) is not None

    def _write(self, type: str, actor: str, subject: str, details: dict[str, Any] | None
               ) -> tuple[int, float, str, str] | None:
        """Appends a record: (seq, time, prev, hash), or None when the policy skips it."""
        type_json = _GOOD_TYPES.get(type)
        if type_json is None:
            if not _TYPE_RE.fullmatch(type) or type == ANCHOR_TYPE:
                raise ValueError(f"bad audit record type {type!r}")
            type_json = _quote(type)
            if len(_GOOD_TYPES) < 1024:  # the types are the code's own: a handful
                _GOOD_TYPES[type] = type_json
        wanted = self._wanted.get(type)
        if wanted is None:
            wanted = self._wanted[type] = self._policy.wants(type)
        if not wanted:
            return None
        details_json = _details_json(details)
        with self._lock:
            if self._closed:
                raise ValueError("audit log is closed")
            seq, when, prev = self._last_seq + 1, float(self._clock()), self._last_hash
            digest, line = _record_text(seq, when, type_json, str(actor), str(subject),
                                        details_json, self._prev_json)
            self._append(seq, when, type, digest, line)
        return seq, when, prev, digest

    @property
    def policy(self) -> AuditPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: AuditPolicy) -> None:
        """A new policy (a reload): which types it wants is asked again."""
        self._policy = policy
        self._wanted: dict[str, bool] = {}

    def _append(self, seq: int, when: float, type: str, digest: str, line: bytes) -> None:
        offset = self._size
        try:
            written = 0
            while written < len(line):
                written += self._fh.write(line[written:]) or 0
        except OSError:
            os.truncate(self.path, offset)
            raise
        self._size += len(line)
        self._index.add(offset, seq, when)
        self._last_seq, self._last_hash, self._prev_json = seq, digest, f'"{digest}"'
        self.counts_by_type[type] = self.counts_by_type.get(type, 0) + 1
        self._unsynced += 1
        if (self._unsynced >= self._fsync_every
                or time.monotonic() - self._last_sync >= self.fsync_interval):
            self._sync_soon()
        if self._sink is not None:
            self._emit(line[:-1].decode("ascii"))

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

    def _sync_soon(self) -> None:
        """Has the background syncer fsync the file (called with _lock held)."""
        if not self._sync_pending:
            self._sync_pending = True
            _syncer().submit(self._background_sync)

    def _background_sync(self) -> None:
        try:
            self.sync()
        except OSError as exc:  # counted and logged; the next trigger tries again
            self.sync_errors += 1
            log.error("audit log %s: fsync failed: %s", self.path, exc)
        finally:
            self._sync_pending = False

    def sync(self) -> None:
        """Forces written records to disk (for a periodic timer; from any thread).

        record() goes on meanwhile: the fsync runs without the lock it takes.
        """
        with self._fd_lock:
            with self._lock:
                if self._closed or not self._unsynced:
                    return
                fd, pending, started = self._fh.fileno(), self._unsynced, time.monotonic()
            os.fsync(fd)
            with self._lock:
                self._unsynced = max(0, self._unsynced - pending)
                self._last_sync = started

    def close(self) -> None:
        """Syncs and releases the file and the writer lock. Idempotent."""
        with self._fd_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            os.fsync(self._fh.fileno())
            self._unsynced = 0
            self._fh.close()
            self._lockfile.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reader(self) -> tuple[IO[bytes], int, _Index, tuple[int, str]]:
        """A consistent view for reading without the lock: the file (as the index knows
        it), where its last complete record ends, the index's arrays and the head."""
        with self._lock:
            fh = self.path.open("rb")
            view = _Index(self._index.max_blocks)
            index = self._index
            view.offsets, view.seqs, view.counts = index.offsets, index.seqs, index.counts
            view.tmin, view.tmax, view.stride = index.tmin, index.tmax, index.stride
            return fh, self._size, view, (self._last_seq, self._last_hash)

    def verify(self) -> VerifyResult:
        """Verifies the file, also against the head held in memory (catches a cut tail).

        It reads up to the head it saw when it started; record() goes on meanwhile.
        """
        fh, size, _, head = self._reader()
        with fh:
            result = _verify(fh, expect_last=head, limit=size)
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
        fh, size, index, _ = self._reader()
        blocks = len(index)
        top = blocks if below is None else bisect_left(index.seqs, below, 0, blocks)
        with fh:
            for b in range(top - 1, -1, -1):
                if (start is not None and index.tmax[b] < start) or (
                        end is not None and index.tmin[b] >= end):
                    continue
                for rec in reversed(_block_records(fh, index, b, blocks, size)):
                    when = _time_of(rec)
                    if ((below is not None and rec["seq"] >= below)
                            or (start is not None and when < start)
                            or (end is not None and when >= end)
                            or (types and rec.get("type") not in exact
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
        alone: purging would destroy the evidence. The copy of the kept records is made
        without the lock record() takes; only the records written meanwhile are copied,
        and the file swapped, under it.
        """
        retention = self.policy.retention_seconds
        if retention <= 0:
            return 0
        cutoff = (self._clock() if now is None else now) - retention
        with self._purge_lock:
            result = self.verify()
            if not result.ok:
                log.error("audit log %s: not purging a log that fails verification", self.path)
                return 0
            if self._closed:
                raise ValueError("audit log is closed")
            fh, size, index, _ = self._reader()
            with fh:
                cut = _first_kept(fh, index, size, cutoff)
                if cut is None:
                    return 0
                n, keep_from, last = cut
                purged_before = (self._anchor["details"].get("purged_total", 0)
                                 if self._anchor else 0)
                anchor, line = _seal({
                    "seq": last["seq"], "time": float(self._clock()), "type": ANCHOR_TYPE,
                    "actor": "engine", "subject": "",
                    "details": {"purged": n, "purged_total": purged_before + n,
                                "cutoff": cutoff, "last_purged_seq": last["seq"],
                                "last_purged_hash": last["hash"]},
                    "prev": last["hash"]})
                tmp = Path(f"{self.path}.tmp")
                with open(tmp, "wb", opener=private_opener) as out:
                    out.write(line)
                    fh.seek(keep_from)
                    _copy(fh, out, size - keep_from)
                    out.flush()
                    os.fsync(out.fileno())
                    self._swap(tmp, out, fh, size, n, keep_from, last["seq"] + 1, anchor, line)
            _fsync_dir(self.path.parent)
        log.info("audit log %s: purged %d records older than %s", self.path, n, cutoff)
        return n

    def _swap(self, tmp: Path, out: IO[bytes], old: IO[bytes], copied_to: int, n: int,
              keep_from: int, first_kept_seq: int, anchor: dict[str, Any], line: bytes) -> None:
        """Copies what was written since the copy began, then puts the new file in place."""
        with self._fd_lock, self._lock:
            if self._closed:
                tmp.unlink()
                raise ValueError("audit log is closed")
            old.seek(copied_to)
            _copy(old, out, self._size - copied_to)
            out.flush()
            os.fsync(out.fileno())
            self._fh.close()
            os.replace(tmp, self.path)
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held until close()
            shift = keep_from - len(line)
            self._index.drop_front(n, keep_from, first_kept_seq, shift)
            self._size -= shift
            self._anchor = anchor
            self._unsynced = 0
            self.counts_by_type[ANCHOR_TYPE] = self.counts_by_type.get(ANCHOR_TYPE, 0) + 1
            self._emit(line.decode("ascii").rstrip("\n"))


def _copy(src: IO[bytes], dst: IO[bytes], length: int) -> None:
    """Copies `length` bytes from src's position to dst."""
    while length > 0:
        data = src.read(min(length, 1 << 20))
        if not data:
            raise OSError("audit log ended before the bytes to copy")
        dst.write(data)
        length -= len(data)


def _block_records(fh: IO[bytes], index: _Index, b: int, blocks: int,
                   size: int) -> list[dict[str, Any]]:
    """The indexed records of block b, in file order."""
    lo = index.offsets[b]
    hi = index.offsets[b + 1] if b + 1 < blocks else size
    fh.seek(lo)
    records = []
    for raw in fh.read(hi - lo).split(b"\n"):
        rec = _parse(raw) if raw else None
        if _indexed(rec):
            assert rec is not None
            records.append(rec)
    return records


def _first_kept(fh: IO[bytes], index: _Index, size: int,
                cutoff: float) -> tuple[int, int, dict[str, Any]] | None:
    """(records to drop, byte offset of the first kept one or `size`, the last dropped
    record) for a purge at cutoff; None if the first record is inside the retention.

    As before the index had blocks: everything up to the first record at or after the
    cutoff goes. A block whose newest time is older than the cutoff is skipped unread.
    """
    blocks, n = len(index), 0
    for b in range(blocks):
        if index.tmax[b] < cutoff:  # every record of the block is older
            n += index.counts[b]
            continue
        records = _block_records(fh, index, b, blocks, size)
        for i, rec in enumerate(records):
            if _time_of(rec) >= cutoff:
                if n + i == 0:
                    return None
                before = records[i - 1] if i else _last_of(fh, index, b, size)
                return n + i, _offset_of(fh, index, b, i, size), before
        n += len(records)
    if n == 0:
        return None
    return n, size, _last_of(fh, index, blocks, size)


def _last_of(fh: IO[bytes], index: _Index, b: int, size: int) -> dict[str, Any]:
    """The last indexed record before block b."""
    return _block_records(fh, index, b - 1, len(index), size)[-1]


def _offset_of(fh: IO[bytes], index: _Index, b: int, i: int, size: int) -> int:
    """Byte offset of the i-th indexed record of block b."""
    lo = index.offsets[b]
    hi = index.offsets[b + 1] if b + 1 < len(index) else size
    fh.seek(lo)
    offset, seen = lo, 0
    for raw in fh.read(hi - lo).split(b"\n"):
        if _indexed(_parse(raw) if raw else None):
            if seen == i:
                return offset
            seen += 1
        offset += len(raw) + 1
    raise AssertionError("record not in its block")


_SYNCER: ThreadPoolExecutor | None = None
_SYNCER_LOCK = threading.Lock()


def _syncer() -> ThreadPoolExecutor:
    """The one background thread that runs the fsyncs records trigger (for every log)."""
    global _SYNCER
    with _SYNCER_LOCK:
        if _SYNCER is None:
            _SYNCER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-fsync")
        return _SYNCER
