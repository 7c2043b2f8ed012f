"""Benchmark "scrape": what one Prometheus scrape of the exporter costs, against its baselines.

1. render: our render_text(registry.collect()) versus prometheus_client's
   generate_latest(registry) on the very same registry (the exporter's Scrape
   plus 0, 1k, 10k, 100k synthetic series), because generate_latest is what we
   would use if render_text did not exist. A second pair renders families
   collected beforehand, to separate formatting from collection.
2. http: the real exporter process and Debian's node_exporter, both with default
   settings, scraped alternately by one keep-alive client, because the target
   is "no slower than node_exporter on the same host".
3. idle: the exporter's RSS and CPU while scraped at Prometheus's usual 15 s
   interval, against the 60 MB / 1 % of a core targets (node_exporter beside it
   for reference).

Run: .venv/bin/python benchmarks/bench_scrape.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import (
    ROOT,
    fmt_ms,
    free_port,
    ratio,
    say,
    stop,
    summary,
    wait_for_port,
    write_result,
)
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import load_config
from exporter.exposition import render_text
from exporter.service import Exporter

NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
SIZES = (0, 1_000, 10_000, 100_000)
# What Prometheus 2.42 (Debian's) sends; with it our exporter answers OpenMetrics.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
TEXT_ACCEPT = "text/plain;version=0.0.4"
TARGET_RSS_BYTES = 60 * 1024 * 1024
TARGET_CPU_PERCENT = 1.0


@dataclass
class Mode:
    render_rounds: int
    http_warmup: int
    http_rounds: int
    idle_window: float
    idle_interval: float


FULL = Mode(render_rounds=15, http_warmup=10, http_rounds=100, idle_window=60.0,
            idle_interval=15.0)
# Quick keeps the whole script under 20 s: a 10 s idle window scraped every 5 s
# (3x Prometheus's rate, so its CPU figure overstates the real idle cost).
QUICK = Mode(render_rounds=2, http_warmup=2, http_rounds=10, idle_window=10.0,
             idle_interval=5.0)


# --- 1. render -------------------------------------------------------------------------


class Frozen:
    """A collector that returns families collected once, so both renderers see equal input."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families

    def describe(self) -> list[Metric]:
        return []


def registry_with(scrape: Any, series: int) -> CollectorRegistry:
    """The exporter's Scrape plus `series` synthetic two-label gauge series in one registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(scrape)
    if series:
        gauge = Gauge("bench_synthetic_value", "Synthetic series for the render benchmark.",
                      ["shard", "item"], registry=registry)
        for i in range(series):
            gauge.labels(f"s{i % 100}", f"item-{i}").set(i * 1.5)
    return registry


def frozen_registry(families: list[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Frozen(families))
    return registry


def sample_set(text: str) -> set[tuple[Any, ...]]:
    """Every family header and sample as the reference parser reads them, NaN made comparable."""
    out: set[tuple[Any, ...]] = set()
    for family in text_string_to_metric_families(text):
        out.add(("family", family.name, family.type, family.documentation))
        for s in family.samples:
            value = "NaN" if math.isnan(s.value) else s.value
            out.add((s.name, frozenset(s.labels.items()), value, s.timestamp))
    return out


def check_same_samples(families: list[Metric]) -> int:
    """Fails loudly if render_text and generate_latest disagree on the same families."""
    ours = sample_set(render_text(families).decode("utf-8"))
    theirs = sample_set(generate_latest(frozen_registry(families)).decode("utf-8"))
    if ours != theirs:
        only_ours = sorted(map(repr, ours - theirs))[:10]
        only_theirs = sorted(map(repr, theirs - ours))[:10]
        raise SystemExit("render_text and generate_latest parse to different samples:\n"
                         f"  only in render_text: {only_ours}\n"
                         f"  only in generate_latest: {only_theirs}")
    return len(ours)


def render_registry(registry: CollectorRegistry) -> bytes:
    """What /metrics does, but reading a registry so generate_latest sees the same input."""
    return render_text(registry.collect())


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call, averaged over `repeat` calls after a full collection."""
    gc.collect()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


@dataclass
class RenderCase:
    """One registry size, with its families collected once for the formatting-only pair."""

    size: int
    registry: CollectorRegistry
    families: list[Metric]
    frozen: CollectorRegistry
    series: int
    repeat: int


def bench_render(mode: Mode) -> dict[str, Any]:
    exporter = Exporter(load_config(None, {"server": {"state_dir": tempfile.mkdtemp()}}))
    cases = []
    for size in SIZES:
        registry = registry_with(exporter.scrape, size)
        families = list(registry.collect())
        cases.append(RenderCase(
            size=size, registry=registry, families=families, frozen=frozen_registry(families),
            series=sum(len(f.samples) for f in families),
            repeat=5 if size <= 1_000 else 2 if size <= 10_000 else 1))
    # The registries are long-lived: keep them out of the collector's scans, as they
    # would sit in the oldest generation of a running server.
    gc.collect()
    gc.freeze()
    compared = check_same_samples(cases[1].families)
    say(f"render: outputs agree ({compared} families and samples compared at "
        f"{cases[1].series} series)")

    times: dict[tuple[int, str], list[float]] = {}
    for rnd in range(mode.render_rounds):
        for case in cases:
            reg, fams, frozen = case.registry, case.families, case.frozen
            pairs: list[tuple[str, Callable[[], object]]] = [
                ("ours", partial(render_registry, reg)),
                ("generate_latest", partial(generate_latest, reg)),
                ("ours_format_only", partial(render_text, fams)),
                ("generate_latest_format_only", partial(generate_latest, frozen)),
            ]
            if rnd % 2:  # alternate who goes first, so warm caches favour neither
                pairs = [pairs[1], pairs[0], pairs[3], pairs[2]]
            for name, fn in pairs:
                times.setdefault((case.size, name), []).append(timed(fn, case.repeat))

    rows = []
    for case in cases:
        size, series = case.size, case.series
        row: dict[str, Any] = {"synthetic_series": size, "series": series}
        for name in ("ours", "generate_latest", "ours_format_only",
                     "generate_latest_format_only"):
            stats = summary([t * 1000 for t in times[(size, name)]])
            row[name] = {"ms": stats, "ms_per_1k_series": stats["median"] / series * 1000}
        row["ratio"] = ratio(row["ours"]["ms"]["median"], row["generate_latest"]["ms"]["median"])
        row["ratio_format_only"] = ratio(row["ours_format_only"]["ms"]["median"],
                                         row["generate_latest_format_only"]["ms"]["median"])
        rows.append(row)
        say(f"render {series:>7} series: ours {row['ours']['ms']['median']:8.2f} ms, "
            f"generate_latest {row['generate_latest']['ms']['median']:8.2f} ms, "
            f"ratio {row['ratio']:.2f} (format only {row['ratio_format_only']:.2f})")
    gc.unfreeze()
    return {"rounds": mode.render_rounds, "samples_compared": compared, "sizes": rows}


# --- 2. http ---------------------------------------------------------------------------


@dataclass
class Target:
    """One server under test and what its scrapes measured."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    latency: dict[str, list[float]] = field(default_factory=dict)
    wire_bytes: dict[str, list[int]] = field(default_factory=dict)
    body_bytes: dict[str, list[int]] = field(default_factory=dict)
    series: dict[str, list[int]] = field(default_factory=dict)
    content_type: dict[str, str] = field(default_factory=dict)
    collector_seconds: dict[str, list[float]] = field(default_factory=dict)


_COLLECTOR_DURATION = re.compile(
    r'^(?:a3mailer_exporter_collector_duration_seconds|node_scrape_collector_duration_seconds)'
    r'\{collector="([^"]+)"\} (\S+)', re.MULTILINE)


def scrape(client: httpx.Client, target: Target, accept: str) -> tuple[float, int, bytes, str]:
    """One scrape as Prometheus does it (gzip); timed to the last raw byte, before gunzip."""
    headers = {"accept": accept, "accept-encoding": "gzip"}
    start = time.perf_counter()
    with client.stream("GET", target.url, headers=headers) as response:
        raw = b"".join(response.iter_raw())
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        encoding = response.headers.get("content-encoding", "")
        content_type = response.headers.get("content-type", "")
    body = gzip.decompress(raw) if encoding == "gzip" else raw
    return elapsed, len(raw), body, content_type


def record(target: Target, variant: str, result: tuple[float, int, bytes, str]) -> None:
    elapsed, wire, body, content_type = result
    text = body.decode("utf-8")
    target.latency.setdefault(variant, []).append(elapsed)
    target.wire_bytes.setdefault(variant, []).append(wire)
    target.body_bytes.setdefault(variant, []).append(len(body))
    target.series.setdefault(variant, []).append(
        sum(1 for line in text.splitlines() if line and not line.startswith("#")))
    target.content_type[variant] = content_type
    if variant == "text":
        for collector, seconds in _COLLECTOR_DURATION.findall(text):
            target.collector_seconds.setdefault(collector, []).append(float(seconds))


def host_tcp_sockets() -> int:
    """Lines in /proc/net/tcp{,6}: the exporter's system collector reads every one per scrape."""
    total = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name, encoding="ascii") as fh:
            total += sum(1 for _ in fh) - 1
    return total


def bench_http(mode: Mode, client: httpx.Client, ours: Target, node: Target) -> dict[str, Any]:
    variants = {"text": TEXT_ACCEPT, "prometheus_accept": PROMETHEUS_ACCEPT}
    for _ in range(mode.http_warmup):
        for target in (ours, node):
            for accept in variants.values():
                scrape(client, target, accept)
    for rnd in range(mode.http_rounds):
        order = (ours, node) if rnd % 2 == 0 else (node, ours)
        for variant, accept in variants.items():
            for target in order:
                record(target, variant, scrape(client, target, accept))

    result: dict[str, Any] = {"rounds": mode.http_rounds, "warmup_rounds": mode.http_warmup,
                              "client": f"httpx {httpx.__version__}, one keep-alive client, "
                                        "accept-encoding gzip",
                              "host_tcp_sockets": host_tcp_sockets(), "variants": {}}
    for variant, accept in variants.items():
        entry: dict[str, Any] = {"accept": accept}
        for target in (ours, node):
            lat = summary([t * 1000 for t in target.latency[variant]])
            series = statistics.median(target.series[variant])
            entry[target.name] = {
                "ms": lat,
                "series": series,
                "wire_bytes": statistics.median(target.wire_bytes[variant]),
                "body_bytes": statistics.median(target.body_bytes[variant]),
                "content_type": target.content_type[variant],
                "ms_per_1k_series": lat["median"] / series * 1000,
            }
        entry["ratio"] = ratio(entry[ours.name]["ms"]["median"], entry[node.name]["ms"]["median"])
        entry["ratio_per_series"] = ratio(entry[ours.name]["ms_per_1k_series"],
                                          entry[node.name]["ms_per_1k_series"])
        result["variants"][variant] = entry
        say(f"http {variant}: exporter {entry[ours.name]['ms']['median']:.2f} ms "
            f"({entry[ours.name]['series']:.0f} series), node_exporter "
            f"{entry[node.name]['ms']['median']:.2f} ms ({entry[node.name]['series']:.0f} "
            f"series), ratio {entry['ratio']:.2f}")
    for target in (ours, node):
        result[f"{target.name}_collector_ms"] = dict(sorted(
            ((name, statistics.median(v) * 1000) for name, v in target.collector_seconds.items()),
            key=lambda kv: -kv[1]))
    return result


# --- 3. idle ---------------------------------------------------------------------------


def bench_idle(mode: Mode, client: httpx.Client, targets: list[Target]) -> dict[str, Any]:
    """RSS sampled every second and CPU time over the window, scrapes at a fixed interval."""
    procs = {t.name: psutil.Process(t.proc.pid) for t in targets}
    cpu_start = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    rss: dict[str, list[int]] = {name: [] for name in procs}
    start = time.monotonic()
    end = start + mode.idle_window
    next_scrape, next_sample, scrapes = start, start, 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_scrape:
            for target in targets:
                scrape(client, target, TEXT_ACCEPT)
            scrapes += 1
            next_scrape += mode.idle_interval
        if now >= next_sample:
            for name, proc in procs.items():
                rss[name].append(proc.memory_info().rss)
            next_sample += 1.0
        time.sleep(max(0.0, min(next_scrape, next_sample, end) - time.monotonic()))
    wall = time.monotonic() - start
    result: dict[str, Any] = {
        "window_s": round(wall, 2), "scrape_interval_s": mode.idle_interval, "scrapes": scrapes,
        "note": "CPU% is the process's user+system CPU time over the window divided by wall "
                "time, as a share of one core; RSS sampled once a second.",
    }
    for name, proc in procs.items():
        cpu = sum(proc.cpu_times()[:2]) - cpu_start[name]
        result[name] = {"rss_mb_max": max(rss[name]) / 2**20,
                        "rss_mb_median": statistics.median(rss[name]) / 2**20,
                        "cpu_percent_of_core": cpu / wall * 100}
        say(f"idle {name}: RSS max {result[name]['rss_mb_max']:.1f} MB, "
            f"CPU {result[name]['cpu_percent_of_core']:.3f} % of a core "
            f"({scrapes} scrapes in {wall:.0f} s)")
    return result


# --- main ------------------------------------------------------------------------------


def targets_met(render: dict[str, Any], http: dict[str, Any],
                idle: dict[str, Any]) -> list[dict[str, Any]]:
    """The foundation issue's targets against today's medians."""
    at_10k = next(r for r in render["sizes"] if r["synthetic_series"] == 10_000)
    out = [{
        "target": "rendering 10k series costs no more than 1.0x generate_latest "
                  "on the same registry",
        "measured": f"{at_10k['ratio']:.2f}x", "met": at_10k["ratio"] <= 1.0,
    }]
    for variant, label in (("text", "text format 0.0.4"),
                           ("prometheus_accept", "Prometheus 2.42's Accept header")):
        entry = http["variants"][variant]
        out.append({
            "target": f"the default scrape takes no longer than node_exporter's ({label})",
            "measured": f"{entry['ratio']:.2f}x "
                        f"({fmt_ms(entry['exporter']['ms']['median'] / 1000)} vs "
                        f"{fmt_ms(entry['node_exporter']['ms']['median'] / 1000)})",
            "met": entry["ratio"] <= 1.0,
        })
    ex = idle["exporter"]
    out.append({"target": "idle exporter under 60 MB RSS",
                "measured": f"{ex['rss_mb_max']:.1f} MB max",
                "met": ex["rss_mb_max"] * 2**20 < TARGET_RSS_BYTES})
    out.append({"target": "idle exporter under 1% of a core with a 15 s scrape interval",
                "measured": f"{ex['cpu_percent_of_core']:.3f} % "
                            f"(scraped every {idle['scrape_interval_s']:g} s)",
                "met": ex["cpu_percent_of_core"] < TARGET_CPU_PERCENT})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run under 20 s")
    parser.add_argument("--out", type=Path, help="result file (default results/scrape.json)")
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL

    state_dir = tempfile.TemporaryDirectory(prefix="bench-scrape-")
    ours_port, node_port = free_port(), free_port()
    # Both servers boot while the render part runs; their logs are not needed.
    ours_proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "run", "--listen", f"127.0.0.1:{ours_port}",
         "--state-dir", state_dir.name],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node_proc = subprocess.Popen(
        [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{node_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        began = time.monotonic()
        render = bench_render(mode)
        say(f"render part took {time.monotonic() - began:.1f} s")
        wait_for_port(ours_port, ours_proc)
        wait_for_port(node_port, node_proc)
        say(f"servers listening after {time.monotonic() - began:.1f} s")
        ours = Target("exporter", f"http://127.0.0.1:{ours_port}/metrics", ours_proc)
        node = Target("node_exporter", f"http://127.0.0.1:{node_port}/metrics", node_proc)
        with httpx.Client(timeout=30.0) as client:
            http = bench_http(mode, client, ours, node)
            idle = bench_idle(mode, client, [ours, node])
    finally:
        stop(ours_proc)
        stop(node_proc)
        state_dir.cleanup()

    node_version = subprocess.run([NODE_EXPORTER, "--version"], capture_output=True,
                                  text=True, check=False)
    path = write_result("scrape", args.out, {
        "mode": "quick" if args.quick else "full",
        "baselines": {"render": "prometheus_client.generate_latest on the same registry",
                      "http": (node_version.stdout or node_version.stderr).splitlines()[0]},
        "render": render, "http": http, "idle": idle,
        "targets": targets_met(render, http, idle),
    })
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
