"""Mail queues: Postfix's five queues (postqueue -j) and A3Mailer/Stalwart's queue (its API).

Each source is a `Periodic` (monitoring.queues.<source>.interval); the "queues"
collector reads their last results. A failed check exports no queue series for
that source (never stale or made-up numbers) and a3mailer_queue_check_success 0;
the reason goes to /health (`queue_check`) and the log.

Postfix: `postqueue [-c config_dir] -j` prints one JSON object per message
(queue_name, queue_id, arrival_time, message_size, sender, recipients[] with
address and, when deferred, delay_reason). Its output is read line by line, so
a large queue costs memory only for the counts. Exported per queue (active,
deferred, hold, incoming, maildrop; all five always, 0 when empty): messages,
bytes, recipients, the oldest message's age, and histograms of ages
(now - arrival_time) and sizes. A line that is not a complete JSON object (a
truncated last line, say) or has a negative message_size is skipped: the other
messages are still counted and the check reports the problem (success 0).
postqueue missing, exiting non-zero or outliving its timeout (its process group
is then killed, a wrapper script's children too) is a failed check.

A3Mailer/Stalwart: GET /api/queue/messages?limit=1 answers {"data": {"items",
"total", ...}}; `total` counts every queued message, exported as
a3mailer_queue_messages{queue="stalwart"}. Ages and sizes would need the whole
queue listed (values=1), so they are Postfix-only.

a3mailer_queue_total_messages sums every queue of every source that answered;
`queue_check` compares it with monitoring.alert_thresholds.queue_size_threshold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.utils import floatToGoString

from exporter import catalogue
from exporter.collectors.stalwart import StalwartClient, StalwartError, require_content
from exporter.config import parse_duration
from exporter.health import Check, CheckResult, Status
from exporter.schedule import Periodic

log = logging.getLogger(__name__)

POSTFIX_QUEUES = ("active", "deferred", "hold", "incoming", "maildrop")
STALWART_QUEUE = "stalwart"
STALWART_QUEUE_PATH = "/api/queue/messages?limit=1"

# Upper bounds of the age histogram: 1m 5m 15m 30m 1h 2h 4h 8h 12h 1d 2d 3d 5d 7d.
# 5d is Postfix's default maximal_queue_lifetime (a deferred message bounces then).
AGE_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0,
               86400.0, 172800.0, 259200.0, 432000.0, 604800.0)
# Upper bounds of the size histogram, bytes: 1k 10k 50k 100k 500k 1M 5M 10M 25M 50M 100M.
# Postfix's default message_size_limit is 10240000.
SIZE_BUCKETS = (1e3, 1e4, 5e4, 1e5, 5e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8)

# Where Debian and others put postqueue when it is not on PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Longest postqueue -j line read (one message with thousands of recipients fits).
_LINE_LIMIT = 8 * 1024 * 1024
_YIELD_EVERY = 500  # lines parsed between yields to the event loop


class QueueCheckError(Exception):
    """A queue source gave no usable answer; the message says why."""


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((floatToGoString(bound), float(running)))
        return out


@dataclass
class QueueStats:
    """One queue as seen by the last check."""

    messages: int = 0
    bytes: int = 0
    recipients: int = 0
    oldest_age: float = 0.0
    detailed: bool = True  # False: only `messages` is known (Stalwart)
    ages: Histogram = field(default_factory=lambda: Histogram(AGE_BUCKETS))
    sizes: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))

    def add(self, age: float, size: int, recipients: int) -> None:
        self.messages += 1
        self.bytes += size
        self.recipients += recipients
        self.oldest_age = max(self.oldest_age, age)
        self.ages.observe(age)
        self.sizes.observe(size)


@dataclass
class QueueSnapshot:
    """A source's queues; `problem` set when the answer was incomplete (partial counts)."""

    queues: dict[str, QueueStats]
    problem: str = ""
    note: str = ""  # what the source said besides (postqueue's warnings)

    @property
    def total(self) -> int:
        return sum(q.messages for q in self.queues.values())


# --------------------------------------------------------------------------- Postfix


class PostqueueParser:
    """Counts `postqueue -j` lines as they come; tolerates and reports bad ones."""

    def __init__(self, now: float):
        self.now = now
        self.queues = {name: QueueStats() for name in POSTFIX_QUEUES}
        self.bad_lines = 0
        self.unknown_queues = 0
        self.truncated = False
        self._first_bad = ""

    def feed(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
            queue = self.queues.get(record["queue_name"])
            arrival = float(record["arrival_time"])
            if not math.isfinite(arrival):  # 1e400 is valid JSON, and infinite
                raise ValueError("arrival_time is not a finite number")
            size = int(record["message_size"])
            if size < 0:  # would export a negative a3mailer_queue_size_bytes
                raise ValueError("message_size is negative")
            recipients = len(record.get("recipients") or ())
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            self.bad_lines += 1
            self.truncated = not line.endswith(b"\n")  # only the last line can lack one
            if not self._first_bad:
                self._first_bad = f"{type(exc).__name__} in {line[:80]!r}"
            return
        if queue is None:
            self.unknown_queues += 1
            return
        queue.add(max(0.0, self.now - arrival), size, recipients)

    def skip(self, what: str) -> None:
        self.bad_lines += 1
        self._first_bad = self._first_bad or what

    def finish(self, note: str = "") -> QueueSnapshot:
        problems = []
        if self.bad_lines:
            parsed = sum(q.messages for q in self.queues.values())
            what = ("output truncated in its last line" if self.truncated and self.bad_lines == 1
                    else f"{self.bad_lines} unreadable line(s), first: {self._first_bad}")
            problems.append(f"postqueue -j {what}; {parsed} message(s) counted")
        if self.unknown_queues:
            note = "; ".join(filter(None, [note, f"{self.unknown_queues} message(s) in queues "
                                                 "other than the five left out"]))
        return QueueSnapshot(self.queues, "; ".join(problems), note)


def find_postqueue(path: str) -> str | None:
    """The postqueue executable: the configured path, or found on PATH or in the sbin dirs."""
    if os.sep in path:
        return path if os.access(path, os.X_OK) else None
    search = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    return shutil.which(path, path=search)


async def _tail(stream: asyncio.StreamReader, keep: int = 4096) -> bytes:
    """Reads a stream to its end, keeping its last `keep` bytes."""
    data = b""
    while chunk := await stream.read(65536):
        data = (data + chunk)[-keep:]
    return data


async def read_postqueue(postqueue_path: str, config_dir: str, timeout: float
                         ) -> QueueSnapshot:
    """Runs postqueue -j once; raises QueueCheckError when it gives no usable answer."""
    binary = find_postqueue(postqueue_path)
    if binary is None:
        raise QueueCheckError(f"postqueue not found ({postqueue_path!r}; searched PATH and "
                              f"{', '.join(_SBIN_DIRS)})")
    argv = [binary, *(["-c", config_dir] if config_dir else []), "-j"]
    try:  # in its own process group, so that a timeout kills a wrapper script's children too
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=_LINE_LIMIT, start_new_session=True)
    except OSError as exc:
        raise QueueCheckError(f"cannot run {binary}: {exc.strerror or exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    parser = PostqueueParser(time.time())
    stderr = asyncio.create_task(_tail(proc.stderr))
    finished = False
    try:
        async with asyncio.timeout(timeout):
            lines = 0
            while True:
                try:
                    line = await proc.stdout.readline()
                except ValueError:  # longer than _LINE_LIMIT: its pieces count as unreadable
                    parser.skip("a line longer than 8 MiB")
                    continue
                if not line:
                    break
                parser.feed(line)
                lines += 1
                if lines % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            returncode = await proc.wait()
            errors = (await stderr).decode("utf-8", "replace").strip()
            finished = True
    except TimeoutError:
        raise QueueCheckError(f"{' '.join(argv)} did not finish within {timeout:g}s (killed)"
                              ) from None
    finally:
        if not finished:  # the whole group: a wrapper may have exited, leaving its children
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if not stderr.done():
            stderr.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stderr
    last_error = errors.splitlines()[-1] if errors else ""
    if returncode != 0:
        raise QueueCheckError(f"{' '.join(argv)} exited with status {returncode}"
                              + (f": {last_error}" if last_error else ""))
    return parser.finish(note=last_error)


# --------------------------------------------------------------------------- Stalwart


def parse_stalwart_queue(body: bytes, url: str) -> QueueSnapshot:
    """The queue total from GET /api/queue/messages's {"data": {"items", "total"}}."""
    try:
        total = json.loads(body)["data"]["total"]
    except (ValueError, KeyError, TypeError) as exc:
        raise QueueCheckError(f"GET {url}: not the queue listing (no data.total): "
                              f"{body[:80]!r}") from exc
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise QueueCheckError(f"GET {url}: data.total is not a count: {total!r}")
    return QueueSnapshot({STALWART_QUEUE: QueueStats(messages=total, detailed=False)})


async def read_stalwart_queue(client: StalwartClient) -> QueueSnapshot:
    url = client.url + STALWART_QUEUE_PATH

    def fetch() -> QueueSnapshot:
        response = client.get_ok(STALWART_QUEUE_PATH, "application/json", 1024 * 1024)
        require_content(url, response, "JSON")
        return parse_stalwart_queue(response.body, url)

    try:
        return await asyncio.to_thread(fetch)
    except StalwartError as exc:
        raise QueueCheckError(str(exc)) from None


# --------------------------------------------------------------------------- wiring


class _Logged:
    """Wraps a source's read: logs when its problem appears, changes or clears."""

    def __init__(self, source: str, read: Callable[[], Awaitable[QueueSnapshot]]):
        self.source, self.read, self.last = source, read, ""

    async def __call__(self) -> QueueSnapshot:
        try:
            snapshot = await self.read()
            problem = snapshot.problem
        except QueueCheckError as exc:
            problem = str(exc)
            self._report(problem)
            raise
        self._report(problem)
        return snapshot

    def _report(self, problem: str) -> None:
        if problem and problem != self.last:
            log.warning("queue check failed", extra={"source": self.source, "error": problem})
        elif self.last and not problem:
            log.info("queue check recovered", extra={"source": self.source})
        self.last = problem


def queue_sources(section: Mapping[str, Any]) -> dict[str, Periodic[QueueSnapshot]]:
    """The enabled sources of monitoring.queues, by name (postfix, stalwart), not started.

    Each source bounds its own run by `timeout` (and says why it failed); the
    Periodic's timeout, one second longer, is only a backstop.
    """
    sources: dict[str, Periodic[QueueSnapshot]] = {}
    postfix = section["postfix"]
    if postfix["enabled"]:
        timeout = parse_duration(postfix["timeout"])

        async def run_postqueue() -> QueueSnapshot:
            return await read_postqueue(postfix["postqueue_path"], postfix["config_dir"],
                                        timeout)

        sources["postfix"] = Periodic("queue-postfix", _Logged("postfix", run_postqueue),
                                      parse_duration(postfix["interval"]), timeout + 1.0)
    stalwart = section["stalwart"]
    if stalwart["enabled"]:
        client = StalwartClient.from_config(stalwart)

        async def run_stalwart() -> QueueSnapshot:
            return await read_stalwart_queue(client)

        sources["stalwart"] = Periodic("queue-stalwart", _Logged("stalwart", run_stalwart),
                                       parse_duration(stalwart["interval"]),
                                       client.timeout + 1.0)
    return sources


def _usable(source: Periodic[QueueSnapshot]) -> QueueSnapshot | None:
    return source.last.value if source.last.ok else None


class QueuesCollector:
    name = "queues"

    def __init__(self, sources: Mapping[str, Periodic[QueueSnapshot]]):
        self.sources = dict(sources)

    def collect(self) -> Iterator[Metric]:
        names = ("a3mailer_queue_messages", "a3mailer_queue_size_bytes",
                 "a3mailer_queue_recipients", "a3mailer_queue_oldest_message_age_seconds",
                 "a3mailer_queue_message_age_seconds", "a3mailer_queue_message_size_bytes")
        messages, size, recipients, oldest, ages, sizes = (catalogue.family(n) for n in names)
        success = catalogue.family("a3mailer_queue_check_success")
        duration = catalogue.family("a3mailer_queue_check_duration_seconds")
        total: int | None = None
        for source_name, source in self.sources.items():
            snapshot = _usable(source)
            ok = snapshot is not None and not snapshot.problem
            success.add_metric([source_name], 1.0 if ok else 0.0)
            duration.add_metric([source_name], source.last.duration)
            if snapshot is None:
                continue
            total = (total or 0) + snapshot.total
            for queue, stats in snapshot.queues.items():
                messages.add_metric([queue], stats.messages)
                if not stats.detailed:
                    continue
                size.add_metric([queue], stats.bytes)
                recipients.add_metric([queue], stats.recipients)
                oldest.add_metric([queue], stats.oldest_age)
                ages.add_metric([queue], stats.ages.cumulative(), stats.ages.total)
                sizes.add_metric([queue], stats.sizes.cumulative(), stats.sizes.total)
        yield from (messages, size, recipients, oldest, ages, sizes)
        if total is not None:
            yield catalogue.single("a3mailer_queue_total_messages", total)
        yield from (success, duration)


def queue_check(sources: Mapping[str, Periodic[QueueSnapshot]], threshold: int) -> Check:
    """Degraded above queue_size_threshold, or while a source fails (the reason says which)."""

    async def check() -> CheckResult:
        details: dict[str, Any] = {"queue_size_threshold": threshold}
        problems, total, waiting = [], 0, []
        for name, source in sources.items():
            last = source.last
            if last.runs == 0:
                waiting.append(name)
                continue
            snapshot = _usable(source)
            if snapshot is None:
                problems.append(f"{name}: {last.error}")
                continue
            total += snapshot.total
            details[name] = {queue: stats.messages for queue, stats in snapshot.queues.items()}
            if snapshot.problem:
                problems.append(f"{name}: {snapshot.problem}")
            if snapshot.note:
                details[f"{name}_note"] = snapshot.note
        details["total_messages"] = total
        if waiting and not problems and len(waiting) == len(sources):
            return CheckResult(Status.UNKNOWN, "queues not checked yet", details)
        if total > threshold:
            problems.insert(0, f"{total} messages queued > queue_size_threshold {threshold}")
        if problems:
            return CheckResult(Status.DEGRADED, "; ".join(problems), details)
        return CheckResult(Status.HEALTHY, f"{total} messages queued", details)

    return check
