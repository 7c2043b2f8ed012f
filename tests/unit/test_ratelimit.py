"""GCRA rate limiting: exact burst and refill arithmetic, LRU bound, headers, properties."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from security.ratelimit import SLACK, Limit, RateLimiter, Result, gcra, headers

EPOCH = 1_700_000_000.0  # realistic Unix times, where float precision is coarsest


def test_limit_arithmetic_and_validation():
    limit = Limit(rate=300, window=60, burst=10)
    assert limit.emission_interval == pytest.approx(0.2)
    assert limit.tolerance == pytest.approx(2.0)
    assert limit.capacity == 11
    with pytest.raises(ValueError):
        Limit(rate=0, window=60)
    with pytest.raises(ValueError):
        Limit(rate=1, window=-1)
    with pytest.raises(ValueError):
        Limit(rate=1, window=1, burst=-1)


def test_idle_key_gets_one_plus_burst_then_exact_retry_after():
    limit = Limit(rate=60, window=60, burst=10)  # T = 1 s exactly
    limiter = RateLimiter()
    results = [limiter.hit("anon", "k", limit, now=EPOCH) for _ in range(11)]
    assert all(r.allowed for r in results)
    assert [r.remaining for r in results] == list(range(10, -1, -1))
    refused = limiter.hit("anon", "k", limit, now=EPOCH)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == 1.0
    assert refused.reset_after == 11.0
    assert refused.limit == 11
    # just before retry_after: still refused, with the shorter wait
    almost = limiter.hit("anon", "k", limit, now=EPOCH + 0.5)
    assert not almost.allowed and almost.retry_after == 0.5
    # exactly at retry_after: allowed, and the bucket is empty again
    later = limiter.hit("anon", "k", limit, now=EPOCH + 1.0)
    assert later.allowed and later.remaining == 0 and later.retry_after == 0.0


def test_burst_zero_is_one_request_per_interval():
    limit = Limit(rate=2, window=1, burst=0)  # T = 0.5 s
    assert gcra(None, EPOCH, limit)[0].allowed
    _, tat = gcra(None, EPOCH, limit)
    result, new = gcra(tat, EPOCH + 0.25, limit)
    assert not result.allowed and new is None and result.retry_after == 0.25


def test_steady_rate_is_allowed_exactly():
    # 300/min: T = 0.2 s is not exact in binary; the slack absorbs the rounding
    limit = Limit(rate=300, window=60, burst=0)
    limiter = RateLimiter()
    for i in range(3000):
        assert limiter.hit("auth", "u", limit, now=EPOCH + i * 0.2).allowed, i
    # one more squeezed in half an interval after the last one is refused
    assert not limiter.hit("auth", "u", limit, now=EPOCH + 2999 * 0.2 + 0.1).allowed


def test_steady_rate_after_an_exhausted_burst_is_still_allowed():
    limit = Limit(rate=300, window=60, burst=10)  # the seed's authenticated limit
    limiter = RateLimiter()
    assert all(limiter.hit("auth", "u", limit, now=EPOCH).allowed for _ in range(11))
    assert not limiter.hit("auth", "u", limit, now=EPOCH).allowed
    for i in range(1, 3000):
        assert limiter.hit("auth", "u", limit, now=EPOCH + i * 0.2).allowed, i


def test_bucket_refills_with_time():
    limit = Limit(rate=60, window=60, burst=4)  # T = 1, capacity 5
    limiter = RateLimiter()
    for _ in range(5):
        assert limiter.hit("c", "k", limit, now=EPOCH).allowed
    assert not limiter.hit("c", "k", limit, now=EPOCH).allowed
    # after 3 s, 3 requests are available again
    assert limiter.peek("c", "k", limit, now=EPOCH + 3).remaining == 2
    assert limiter.peek("c", "k", limit, now=EPOCH + 3, cost=0).remaining == 3
    for _ in range(3):
        assert limiter.hit("c", "k", limit, now=EPOCH + 3).allowed
    assert not limiter.hit("c", "k", limit, now=EPOCH + 3).allowed
    # reset_after says when the bucket is full; then a whole burst passes again
    full_at = EPOCH + 3 + limiter.peek("c", "k", limit, now=EPOCH + 3).reset_after
    assert full_at == EPOCH + 8
    assert limiter.peek("c", "k", limit, now=full_at, cost=0).remaining == 5
    assert limiter.prune(now=full_at) == 1 and len(limiter) == 0


def test_peek_records_nothing_and_reset_forgets():
    limit = Limit(rate=60, window=60, burst=1)
    limiter = RateLimiter()
    for _ in range(5):
        assert limiter.peek("c", "k", limit, now=EPOCH).allowed
    assert len(limiter) == 0
    limiter.hit("c", "k", limit, now=EPOCH)
    limiter.hit("c", "k", limit, now=EPOCH)
    assert not limiter.hit("c", "k", limit, now=EPOCH).allowed
    limiter.reset("c", "k")
    assert limiter.hit("c", "k", limit, now=EPOCH).allowed


def test_cost_counts_several_units_and_is_bounded():
    limit = Limit(rate=60, window=60, burst=9)  # capacity 10
    first = gcra(None, EPOCH, limit, cost=4)
    assert first[0].allowed and first[0].remaining == 6
    second = gcra(first[1], EPOCH, limit, cost=7)
    assert not second[0].allowed and second[0].retry_after == 1.0
    with pytest.raises(ValueError):
        gcra(None, EPOCH, limit, cost=11)
    with pytest.raises(ValueError):
        gcra(None, EPOCH, limit, cost=-1)


def test_classes_and_keys_are_independent():
    limit = Limit(rate=60, window=60, burst=0)
    limiter = RateLimiter()
    assert limiter.hit("auth", "a", limit, now=EPOCH).allowed
    assert not limiter.hit("auth", "a", limit, now=EPOCH).allowed
    assert limiter.hit("auth", "b", limit, now=EPOCH).allowed
    assert limiter.hit("anon", "a", limit, now=EPOCH).allowed
    assert len(limiter) == 3


def test_lru_bound_keeps_the_most_recent_keys():
    limit = Limit(rate=60, window=60, burst=0)
    limiter = RateLimiter(max_keys=1000)
    for i in range(10_000):
        limiter.hit("c", str(i), limit, now=EPOCH)
    assert len(limiter) == 1000
    # the newest key is still limited; an evicted one starts over (more lenient)
    assert not limiter.hit("c", "9999", limit, now=EPOCH).allowed
    assert limiter.hit("c", "0", limit, now=EPOCH).allowed
    # a recently used key survives eviction
    limiter.hit("c", "9001", limit, now=EPOCH)
    for i in range(20_000, 20_999):
        limiter.hit("c", str(i), limit, now=EPOCH)
    assert not limiter.peek("c", "9001", limit, now=EPOCH).allowed


def test_headers_allowed_and_refused():
    assert headers(Result(True, 7, 0.0, 2.2, 11)) == {
        "RateLimit-Limit": "11",
        "RateLimit-Remaining": "7",
        "RateLimit-Reset": "3",
    }
    assert headers(Result(False, 0, 0.2, 2.2, 11)) == {
        "RateLimit-Limit": "11",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "3",
        "Retry-After": "1",
    }
    assert headers(Result(False, 0, 4.0000000001, 5.0, 11))["Retry-After"] == "4"
    assert headers(Result(False, 0, 4.01, 5.0, 11))["Retry-After"] == "5"
    assert headers(Result(True, 0, 0.0, 0.0, 1))["RateLimit-Reset"] == "0"


limits = st.builds(
    Limit,
    rate=st.integers(1, 600).map(float),
    window=st.sampled_from([1.0, 10.0, 60.0, 3600.0]),
    burst=st.integers(0, 20),
)
# gaps between requests, in emission intervals: exact multiples find the edges
gaps = st.lists(
    st.one_of(
        st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0, 2.0]),
        st.floats(0, 30, allow_nan=False, allow_infinity=False),
    ),
    min_size=1,
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(limit=limits, gaps=gaps, start=st.floats(0, 2e9, allow_nan=False))
def test_property_never_more_than_rate_plus_burst_in_any_window(limit, gaps, start):
    interval = limit.emission_interval
    limiter = RateLimiter()
    now, allowed = start, []
    for gap in gaps:
        now += gap * interval
        if limiter.hit("c", "k", limit, now=now).allowed:
            allowed.append(now)
    # the densest windows start and end on allowed requests; each allowed request
    # may have come up to SLACK early (float noise), hence the n * SLACK term
    for i in range(len(allowed)):
        for j in range(i, len(allowed)):
            n = j - i + 1
            span = allowed[j] - allowed[i]
            bound = limit.rate * span / limit.window + limit.burst + 1
            assert n <= bound + n * SLACK / interval + 1e-9


@settings(max_examples=300, deadline=None)
@given(limit=limits, gaps=gaps, start=st.floats(0, 2e9, allow_nan=False))
def test_property_spacing_of_one_interval_is_always_allowed(limit, gaps, start):
    interval = limit.emission_interval
    limiter = RateLimiter()
    now, last_allowed = start, None
    for gap in gaps:
        now += gap * interval
        result = limiter.hit("c", "k", limit, now=now)
        if last_allowed is not None and now >= last_allowed + interval:
            assert result.allowed
        if result.allowed:
            last_allowed = now
        else:
            # retry_after is honest: waiting exactly that long is enough
            assert limiter.peek("c", "k", limit, now=now + result.retry_after).allowed


# --- the fast gcra() decides exactly as the implementation it replaced


def reference_gcra(tat, now, rate, window, burst, cost=1):
    """gcra() as it was before the rewrite without per-call dataclass work (commit
    6eb9d7b), with the old Limit properties spelt out: the behaviour to keep, bit for bit."""
    interval = window / rate  # Limit.emission_interval
    capacity = 1 + burst  # Limit.capacity
    if cost < 0 or cost > capacity:
        raise ValueError(cost)
    base = now if tat is None else max(tat, now)
    new_tat = base + cost * interval
    allow_at = new_tat - capacity * interval
    if now < allow_at - SLACK:
        return (False, 0, allow_at - now, base - now, capacity), None
    new_tat = min(new_tat, now + capacity * interval)
    remaining = min(capacity - cost, max(0, math.floor((now - allow_at + SLACK) / interval)))
    return (True, remaining, 0.0, new_tat - now, capacity), new_tat


class ReferenceLimiter:
    """RateLimiter as it was (an OrderedDict LRU of TATs) over reference_gcra."""

    def __init__(self, max_keys):
        self.max_keys, self.tats = max_keys, OrderedDict()

    def hit(self, key, rate, window, burst, now, cost):
        tat = self.tats.get(key)
        if tat is not None:
            self.tats.move_to_end(key)
        result, new_tat = reference_gcra(tat, now, rate, window, burst, cost)
        if new_tat is not None:
            self.tats[key] = new_tat
            while len(self.tats) > self.max_keys:
                self.tats.popitem(last=False)
        return result

    def peek(self, key, rate, window, burst, now, cost):
        return reference_gcra(self.tats.get(key), now, rate, window, burst, cost)[0]


def exactly(decision):
    """A decision compared bit for bit: repr tells 1 from 1.0 and 0.0 from -0.0."""
    if isinstance(decision, Result):
        decision = (decision.allowed, decision.remaining, decision.retry_after,
                    decision.reset_after, decision.limit)
    return tuple(f"{type(v).__name__}:{v!r}" for v in decision)


any_limits = st.tuples(
    st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6)),  # rate
    st.one_of(st.sampled_from([1, 60, 60.0, 3600.0]), st.floats(1e-3, 1e5)),  # window
    st.one_of(st.integers(0, 2), st.integers(0, 60), st.sampled_from([1000, 10**9])),  # burst
)
operations = st.lists(st.tuples(
    st.sampled_from(["hit", "hit", "hit", "peek", "reset"]),
    st.sampled_from(["a", "b", "c"]),
    st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, -1.0]),  # gaps, in intervals
              st.floats(-5, 60, allow_nan=False)),
    st.sampled_from([0.0, 0.0, 5e-7, -5e-7, 1.5e-6, -1.5e-6, -3e-6]),  # around SLACK
    st.one_of(st.just(1), st.integers(0, 3), st.integers(-1, 10**9 + 2))),  # cost
    min_size=1, max_size=120)


@settings(max_examples=400, deadline=None)
@given(limit=any_limits, ops=operations, start=st.floats(0, 4e9, allow_nan=False),
       max_keys=st.integers(1, 3))
def test_property_rewritten_limiter_decides_exactly_like_the_old_one(limit, ops, start,
                                                                       max_keys):
    rate, window, burst = limit
    new, old = RateLimiter(max_keys=max_keys), ReferenceLimiter(max_keys)
    lim = Limit(rate, window, burst)
    assert lim.emission_interval == window / rate and lim.capacity == 1 + burst
    assert lim.tolerance == burst * (window / rate)
    now = start
    for op, key, gap, jitter, cost in ops:
        now += gap * (window / rate) + jitter
        if op == "reset":
            new.reset("c", key)
            old.tats.pop(key, None)
            continue
        try:
            expected = getattr(old, op)(key, rate, window, burst, now, cost)
        except ValueError:
            with pytest.raises(ValueError):
                getattr(new, op)("c", key, lim, now=now, cost=cost)
            continue
        got = getattr(new, op)("c", key, lim, now=now, cost=cost)
        assert isinstance(got, Result) and exactly(got) == exactly(expected)
        assert [(k[1], repr(t)) for k, t in new._tats.items()] == [
            (k, repr(t)) for k, t in old.tats.items()]


@settings(max_examples=400, deadline=None)
@given(limit=any_limits, tat=st.one_of(st.none(), st.floats(0, 4e9, allow_nan=False)),
       now=st.floats(0, 4e9, allow_nan=False), cost=st.integers(0, 70))
def test_property_gcra_matches_the_old_one_on_any_state(limit, tat, now, cost):
    rate, window, burst = limit
    try:
        expected = reference_gcra(tat, now, rate, window, burst, cost)
    except ValueError:
        with pytest.raises(ValueError):
            gcra(tat, now, Limit(rate, window, burst), cost)
        return
    result, new_tat = gcra(tat, now, Limit(rate, window, burst), cost)
    assert exactly(result) == exactly(expected[0]) and repr(new_tat) == repr(expected[1])


@pytest.mark.parametrize("rate,window,burst", [(60, 60, 0), (300, 60, 10), (1000, 60.0, 50),
                                               (7, 3.0, 2)])
def test_slack_edges_decide_like_the_old_one(rate, window, burst):
    """Requests a few microseconds either side of the instant a request fits: where SLACK
    decides (the random walk above rarely lands within a microsecond of it)."""
    interval = window / rate
    for start in (EPOCH, 4e9 - 1000.5):
        tat = None
        for _ in range(burst + 1):  # empty the bucket
            tat = reference_gcra(tat, start, rate, window, burst)[1]
        for k in range(-12, 13):
            now = start + interval + k * 2.5e-7
            for cost in (0, 1):
                expected = reference_gcra(tat, now, rate, window, burst, cost)
                result, new_tat = gcra(tat, now, Limit(rate, window, burst), cost)
                assert exactly(result) == exactly(expected[0]), (k, cost)
                assert repr(new_tat) == repr(expected[1])


def test_result_is_an_immutable_record_with_the_old_fields():
    result = Result(allowed=True, remaining=3, retry_after=0.0, reset_after=1.5, limit=4)
    assert (result.allowed, result.remaining, result.limit) == (True, 3, 4)
    assert repr(result) == ("Result(allowed=True, remaining=3, retry_after=0.0, "
                            "reset_after=1.5, limit=4)")
    with pytest.raises(AttributeError):
        result.allowed = False  # type: ignore[misc]
    assert Limit(300, 60, 10) == Limit(300.0, 60.0, 10) and hash(Limit(300, 60, 10))
    assert repr(Limit(300, 60, 10)) == "Limit(rate=300, window=60, burst=10)"
