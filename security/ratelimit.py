"""GCRA rate limiting: one float of state per key, the same algorithm in every store.

GCRA (the generic cell rate algorithm) keeps, per key, a *theoretical arrival
time* (TAT): the time at which the key's bucket would be full again if no more
requests came. That single float is all a store needs to persist, and `gcra()`
below is the whole algorithm: the memory limiter here, the SQLite store and the
Redis Lua script all implement exactly that function.

Meaning of a `Limit(rate, window, burst)`:

* requests are spaced by the *emission interval* ``T = window / rate``; a key
  that sends one request every ``T`` seconds is never refused;
* ``burst`` is how many requests *beyond that one* an idle key may send at the
  same instant: an idle key may send ``1 + burst`` requests at once (the bucket's
  *capacity*, reported as ``Result.limit``), then one more every ``T`` seconds.
  ``burst=0`` means strictly one request per ``T``;
* consequently, in any interval of length ``W`` at most
  ``rate * W / window + burst + 1`` requests are allowed.

The seed's defaults map to ``Limit(300, 60, 10)`` for authenticated clients (one
request per 0.2 s, 11 at once) and ``Limit(60, 60, 10)`` for anonymous ones.

Times are Unix seconds (``time.time()``), so that several replicas sharing a
store agree on them. A float near today's epoch has only ~0.24 us of precision,
so comparisons allow `SLACK` (one microsecond), and an allowed request's new TAT
is capped at ``now + capacity * T``: a request let through by the slack does not
carry its sub-microsecond overshoot forward, so rounding never accumulates and a
client paced exactly ``T`` apart is never refused.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

SLACK = 1e-6
"""Seconds of tolerance in comparisons: a float near 1.7e9 has ~2.4e-7 s of precision."""

_floor = math.floor


@dataclass(frozen=True, slots=True)
class Limit:
    """`rate` requests per `window` seconds, plus `burst` extra requests at once.

    The derived values gcra() needs are computed once, here, and kept in plain slots:
    a decision reads them, it never recomputes them.
    """

    rate: float
    window: float
    burst: int = 0
    _interval: float = field(init=False, repr=False, compare=False)
    _capacity: int = field(init=False, repr=False, compare=False)
    _span: float = field(init=False, repr=False, compare=False)
    """capacity * interval: how far ahead of now a full bucket's TAT lies."""

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.window > 0):
            raise ValueError(f"rate and window must be positive, got {self.rate}/{self.window}s")
        if self.burst < 0:
            raise ValueError(f"burst must be >= 0, got {self.burst}")
        interval = self.window / self.rate
        capacity = 1 + self.burst
        object.__setattr__(self, "_interval", interval)
        object.__setattr__(self, "_capacity", capacity)
        object.__setattr__(self, "_span", capacity * interval)

    @property
    def emission_interval(self) -> float:
        """Seconds between two requests at the steady rate."""
        return self._interval

    @property
    def tolerance(self) -> float:
        """How far ahead of `now` the TAT may run and still allow a request."""
        return self.burst * self._interval

    @property
    def capacity(self) -> int:
        """Requests an idle key may send at once: ``1 + burst``."""
        return self._capacity


class Result(NamedTuple):
    """One decision; enough to answer the client and fill the RateLimit headers.

    An immutable record (a named tuple: built once per request, it must be cheap)."""

    allowed: bool
    remaining: int
    """Requests (of cost 1) that could still be sent right now, after this one."""
    retry_after: float
    """Seconds until this request would be allowed; 0 when allowed."""
    reset_after: float
    """Seconds until the bucket is full again (all `limit` requests available)."""
    limit: int
    """The bucket's capacity, ``1 + burst``."""


_result = tuple.__new__  # Result's own constructor, without the keyword-argument layer


def gcra(tat: float | None, now: float, limit: Limit, cost: int = 1) -> tuple[Result, float | None]:
    """Decide one request of `cost` units at `now` for a key whose stored TAT is `tat`.

    Returns the decision and the TAT to store: the new value when allowed, None
    (leave the stored value as it is) when refused. `tat=None` means the key has
    no state, which is the same as a full bucket. `cost=0` consumes nothing and
    reports what is available. A cost above the capacity could never be allowed,
    so it is a ValueError rather than an endless refusal.

    The algorithm, for stores to copy::

        T = window / rate; capacity = burst + 1
        base = max(tat or now, now)               # a TAT in the past = full bucket
        new_tat = base + cost * T
        allow_at = new_tat - capacity * T         # earliest time this request fits
        if now < allow_at - SLACK:  refuse; retry_after = allow_at - now;
                                    reset_after = base - now; store nothing
        else:                       allow;  new_tat = min(new_tat, now + capacity * T)
                                    remaining = floor((now - allow_at + SLACK) / T)
                                    reset_after = new_tat - now; store new_tat

    (max and min are written out as comparisons below, with the ties and NaNs resolved
    as the builtins resolve them.)
    """
    capacity = limit._capacity
    if cost < 0 or cost > capacity:
        raise ValueError(f"cost must be between 0 and the capacity {capacity}, got {cost}")
    interval = limit._interval
    base = now if tat is None or now > tat else tat  # max(tat, now)
    new_tat = base + cost * interval
    allow_at = new_tat - limit._span
    if now < allow_at - SLACK:
        return _result(Result, (False, 0, allow_at - now, base - now, capacity)), None
    full = now + limit._span
    if full < new_tat:  # min(new_tat, full)
        new_tat = full
    remaining = _floor((now - allow_at + SLACK) / interval)
    if remaining < 0:
        remaining = 0
    if remaining > capacity - cost:
        remaining = capacity - cost
    return _result(Result, (True, remaining, 0.0, new_tat - now, capacity)), new_tat


class RateLimiter:
    """In-memory GCRA limiter keyed by (class, key), bounded by an LRU of TATs.

    Evicting a key forgets its TAT, which is the same as a full bucket: eviction
    can only make the limiter more lenient for that key, never refuse a request
    that would otherwise pass. Keep `max_keys` above the number of keys active
    within one window so that this never matters in practice.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._tats: OrderedDict[tuple[str, str], float] = OrderedDict()

    def hit(
        self, klass: str, key: str, limit: Limit, now: float | None = None, cost: int = 1
    ) -> Result:
        """Count a request of `cost` units and return the decision.

        Any hit, refused ones included, makes the key the most recently used:
        a key that keeps being refused is the last one worth forgetting.
        """
        if now is None:
            now = time.time()
        slot = (klass, key)
        tats = self._tats
        tat = tats.get(slot)
        if tat is not None:
            tats.move_to_end(slot)
        result, new_tat = gcra(tat, now, limit, cost)
        if new_tat is not None:
            tats[slot] = new_tat
            while len(tats) > self.max_keys:
                tats.popitem(last=False)
        return result

    def peek(
        self, klass: str, key: str, limit: Limit, now: float | None = None, cost: int = 1
    ) -> Result:
        """The decision `hit` would return now, without recording anything."""
        now = time.time() if now is None else now
        return gcra(self._tats.get((klass, key)), now, limit, cost)[0]

    def reset(self, klass: str, key: str) -> None:
        """Forget a key: its bucket is full again."""
        self._tats.pop((klass, key), None)

    def prune(self, now: float | None = None) -> int:
        """Drop keys whose bucket is already full again (TAT in the past); returns how many."""
        now = time.time() if now is None else now
        full = [k for k, tat in self._tats.items() if tat <= now]
        for k in full:
            del self._tats[k]
        return len(full)

    def __len__(self) -> int:
        return len(self._tats)


def _ceil_seconds(seconds: float) -> int:
    """Whole seconds, rounded up, ignoring float noise below `SLACK`."""
    return max(0, math.ceil(seconds - SLACK))


def headers(result: Result) -> dict[str, str]:
    """The RateLimit header fields (draft-ietf-httpapi-ratelimit-headers) for a decision.

    `RateLimit-Limit` is the capacity (1 + burst), `RateLimit-Remaining` what may
    still be sent now, `RateLimit-Reset` the seconds until all of it is available
    again; a refused request also gets `Retry-After` (at least 1 second). The three
    count the same quota units over the draft's window (the Reset of an empty bucket,
    capacity * emission interval); the configured rate per `window` would not match
    Remaining (at most the capacity) nor Reset (at most that window), so it is not the
    Limit.
    """
    fields = {
        "RateLimit-Limit": str(result.limit),
        "RateLimit-Remaining": str(result.remaining),
        "RateLimit-Reset": str(_ceil_seconds(result.reset_after)),
    }
    if not result.allowed:
        fields["Retry-After"] = str(max(1, _ceil_seconds(result.retry_after)))
    return fields
