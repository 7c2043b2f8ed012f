"""Benchmark "record": the cost of one observation on the exporter's request path.

Every HTTP request the exporter serves records one counter increment and one
histogram observation (exporter/http/middleware.py). We compare our
CounterVec/HistogramVec with bare prometheus_client, the library we would use
otherwise: with the child looked up on each call (what a request handler with
runtime label values does) and with a pre-bound child (the library's fastest
path, when labels are known in advance).

Label values live in variables, as in the middleware, so neither side gets a
constant-folded tuple. Figures are ns per call including the timeit loop's own
overhead, which is reported too.

Run: .venv/bin/python benchmarks/bench_record.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

from common import ratio, say, summary, write_result
from prometheus_client import Counter, Histogram

from exporter.instruments import CounterVec, HistogramVec

# case name -> statement; all run with the same namespace
CASES = {
    "loop_overhead": "pass",
    "ours_counter_inc": "counter_vec.inc((handler, code))",
    "client_counter_labels_inc": "counter.labels(handler, code).inc()",
    "client_counter_bound_inc": "counter_child.inc()",
    "ours_histogram_observe": "histogram_vec.observe((handler,), value)",
    "client_histogram_labels_observe": "histogram.labels(handler).observe(value)",
    "client_histogram_bound_observe": "histogram_child.observe(value)",
}
# ours -> the baselines it is compared with
COMPARISONS = {
    "ours_counter_inc": ("client_counter_labels_inc", "client_counter_bound_inc"),
    "ours_histogram_observe": ("client_histogram_labels_observe",
                               "client_histogram_bound_observe"),
}


def namespace() -> dict[str, Any]:
    """Fresh instruments, unregistered so nothing leaks into the default registry."""
    counter = Counter("bench_http_requests", "Requests.", ["handler", "code"], registry=None)
    histogram = Histogram("bench_http_request_duration_seconds", "Latency.", ["handler"],
                          registry=None)
    handler, code = "/metrics", "200"
    return {
        "handler": handler, "code": code, "value": 0.003,
        "counter_vec": CounterVec("a3mailer_exporter_http_requests_total"),
        "histogram_vec": HistogramVec("a3mailer_exporter_http_request_duration_seconds"),
        "counter": counter, "counter_child": counter.labels(handler, code),
        "histogram": histogram, "histogram_child": histogram.labels(handler),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run under 20 s")
    parser.add_argument("--out", type=Path, help="result file (default results/record.json)")
    args = parser.parse_args()
    rounds, number = (3, 100_000) if args.quick else (25, 500_000)

    env = namespace()
    timers = {name: timeit.Timer(stmt, globals=env) for name, stmt in CASES.items()}
    for timer in timers.values():  # warm-up: first-call costs (child creation, caches)
        timer.timeit(1_000)
    names = list(CASES)
    ns: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(rounds):
        # rotate the order each round so drift and cache effects spread over every case
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            ns[name].append(timers[name].timeit(number) / number * 1e9)

    cases: dict[str, dict[str, Any]] = {
        name: {"statement": CASES[name], "ns_per_call": summary(values)}
        for name, values in ns.items()}
    ratios = {}
    for ours, baselines in COMPARISONS.items():
        for baseline in baselines:
            key = f"{ours}/{baseline}"
            ratios[key] = ratio(cases[ours]["ns_per_call"]["median"],
                                cases[baseline]["ns_per_call"]["median"])
    for name, case in cases.items():
        stats = case["ns_per_call"]
        say(f"{name:34s} {stats['median']:7.1f} ns  ({stats['min']:.1f}-{stats['max']:.1f})")
    for key, value in ratios.items():
        say(f"{key:66s} {value:.2f}")
    path = write_result("record", args.out, {
        "mode": "quick" if args.quick else "full",
        "rounds": rounds, "calls_per_round": number,
        "note": "timeit with gc disabled; ns per call include the loop overhead shown "
                "as loop_overhead",
        "cases": cases, "ratios": ratios,
    })
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
