"""Slow sources (probes, DNS, DNSBL, queues, delivery round trips) run on their own
interval; a scrape reads their last result and never waits for them (DESIGN.md).

`Periodic` runs one coroutine function every `interval` seconds, bounded by
`timeout`, and keeps the outcome; collectors and health checks read `last`.
`Worker` gives a source's blocking calls a thread of their own, one call at a time.
Each run is a sample for the performance monitor (path schedule) and a root span
named after the schedule; an error, a timeout, or a result whose `success` is
False (a failed probe) counts as a failed run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from exporter import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """The last run: its value (None until the first success), or the error it raised."""

    value: T | None = None
    error: str = ""
    started: float = 0.0  # Unix time
    duration: float = 0.0
    runs: int = 0
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.runs > 0 and not self.error


async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
    """asyncio.wait_for without its Python 3.11 flaw: a cancellation that arrives just as the
    awaitable finishes is passed on by asyncio.timeout, never swallowed, so a loop that is
    woken (by a reload) and stopped at the same moment still stops."""
    async with asyncio.timeout(seconds):
        return await awaitable


class Busy(Exception):
    """The source's previous blocking call is still running; this one was not started."""


class Worker:
    """One thread of its own for a source's blocking calls (an HTTP GET), one at a time.

    Python's default pool (asyncio.to_thread: min(32, CPUs + 4) threads) also runs log
    ingestion, the health checks and Basic auth; a call the awaiting side gave up on
    keeps its thread until it returns, so a source that hangs would take a thread per
    poll until nothing else runs. Here it holds this one thread only, and a call made
    while the last is still running raises Busy instead of queueing behind it.
    """

    def __init__(self, name: str):
        self.name = name
        self.busy = 0  # calls refused while the previous one ran
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self._running: concurrent.futures.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the worker's thread, with the caller's context (as to_thread)."""
        if self._running is not None and not self._running.done():
            self.busy += 1
            raise Busy(f"the previous {self.name} call is still running (its thread has "
                       "not returned); not started")
        self._running = self._executor.submit(contextvars.copy_context().run, fn, *args)
        return await asyncio.wrap_future(self._running)


class Periodic(Generic[T]):
    def __init__(self, name: str, run: Callable[[], Awaitable[T]], interval: float,
                 timeout: float):
        self.name = name
        self.run = run
        self.interval = interval
        self.timeout = timeout
        self.last: Outcome[T] = Outcome()
        self._task: asyncio.Task[None] | None = None

    async def once(self) -> Outcome[T]:
        """Runs now (also used by tests); a timeout or an exception is recorded, not raised."""
        started, clock = time.time(), time.perf_counter()
        outcome: Outcome[T] = Outcome(started=started, runs=self.last.runs + 1,
                                      failures=self.last.failures)
        with tracing.observe("schedule", self.name, self.name,
                             attributes={"a3mailer.schedule": self.name}) as run:
            try:
                outcome.value = await bounded(self.run(), self.timeout)
            except TimeoutError:
                outcome.error = f"timed out after {self.timeout:g}s"
                run.fail("timeout")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                outcome.error = (f"{type(exc).__name__}: {exc}" if str(exc)
                                 else type(exc).__name__)
                run.fail(type(exc).__name__)
            if getattr(outcome.value, "success", True) is False:
                run.fail("failed")
        if outcome.error:
            outcome.failures += 1
            log.debug("periodic run failed", extra={"source": self.name, "error": outcome.error})
        outcome.duration = time.perf_counter() - clock
        self.last = outcome
        return outcome

    async def _forever(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = tracing.detached_task(self._forever(), f"periodic-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
