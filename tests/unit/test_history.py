"""Monitoring history: retention, hard cap, time-range queries."""

from exporter.history import History


def test_retention_drops_old_entries():
    history = History(retention=60, interval=10, max_entries=1000)
    for t in range(0, 200, 10):
        history.add({"n": t}, now=1000 + t)
    times = [e["timestamp"] for e in history.query()]
    assert times[0] >= 1190 - 60 and times[-1] == 1190


def test_capacity_is_bounded_by_max_entries_whatever_retention_asks():
    history = History(retention=86400 * 365, interval=0.001, max_entries=50)
    for t in range(500):
        history.add({"n": t}, now=1000 + t / 1000)
    assert history.capacity == 50
    assert len(history) == 50
    assert history.query()[-1]["n"] == 499


def test_capacity_follows_retention_over_interval():
    assert History(retention=86400, interval=30, max_entries=10000).capacity == 2881


def test_query_range_and_limit():
    history = History(retention=1000, interval=1, max_entries=1000)
    for t in range(10):
        history.add({"n": t}, now=100 + t)
    assert [e["n"] for e in history.query(start=103, end=105)] == [3, 4, 5]
    assert [e["n"] for e in history.query(limit=2)] == [8, 9]


def test_reconfigure_keeps_newest():
    history = History(retention=1000, interval=1, max_entries=100)
    for t in range(20):
        history.add({"n": t}, now=100 + t)
    history.configure(retention=1000, interval=1, max_entries=5)
    assert [e["n"] for e in history.query()] == [15, 16, 17, 18, 19]
