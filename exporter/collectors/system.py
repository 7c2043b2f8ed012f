"""The host: CPU, load, memory, swap, filesystems, disk I/O, network, TCP states, uptime.

The seed's SystemMetrics, read with psutil at scrape time (like node_exporter,
nothing is cached between scrapes). TCP states come straight from
/proc/net/tcp{,6}: psutil.net_connections() would also walk every process's
file descriptors, which costs tens of milliseconds on a busy mail host.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
from prometheus_client.core import Metric

from exporter import catalogue

CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")

# /proc/net/tcp "st" column -> state label (include/net/tcp_states.h)
TCP_STATES = {
    "01": "established", "02": "syn_sent", "03": "syn_recv", "04": "fin_wait1",
    "05": "fin_wait2", "06": "time_wait", "07": "close", "08": "close_wait",
    "09": "last_ack", "0A": "listen", "0B": "closing", "0C": "new_syn_recv",
}
_PSUTIL_TCP_STATES = {
    psutil.CONN_ESTABLISHED: "established", psutil.CONN_SYN_SENT: "syn_sent",
    psutil.CONN_SYN_RECV: "syn_recv", psutil.CONN_FIN_WAIT1: "fin_wait1",
    psutil.CONN_FIN_WAIT2: "fin_wait2", psutil.CONN_TIME_WAIT: "time_wait",
    psutil.CONN_CLOSE: "close", psutil.CONN_CLOSE_WAIT: "close_wait",
    psutil.CONN_LAST_ACK: "last_ack", psutil.CONN_LISTEN: "listen",
    psutil.CONN_CLOSING: "closing",
}


class CpuUsage:
    """Busy share of CPU time between two calls; each consumer keeps its own.

    A span shorter than MIN_SPAN holds a few 10 ms ticks (0, 50 or 100 %: a health check
    right after start read 100 % and turned the system component degraded), so it answers
    the last share instead, at first the one since boot, and the span goes on growing."""

    MIN_SPAN = 0.5  # CPU seconds, all cores together

    def __init__(self) -> None:
        self._last = self._totals()
        self._share: float | None = None

    @staticmethod
    def _totals() -> tuple[float, float]:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        # guest time is already counted in user time on Linux
        total = sum(getattr(t, mode, 0.0) for mode in CPU_MODES)
        return total, total - idle

    def ratio(self) -> float:
        total, busy = self._totals()
        last_total, last_busy = self._last
        elapsed = total - last_total
        if elapsed < self.MIN_SPAN:
            if self._share is not None:
                return self._share
            return min(1.0, max(0.0, busy / total)) if total > 0 else 0.0
        self._last = (total, busy)
        self._share = min(1.0, max(0.0, (busy - last_busy) / elapsed))
        return self._share


def tcp_states() -> dict[str, int]:
    """Sockets per TCP state, IPv4 and IPv6, every state present (zero when none).

    Reads /proc/net/tcp{,6}: about 1 ms per file plus ~1 us per socket, so it is
    opt-in (monitoring.system.tcp_state_detail); tcp_summary() is the default.
    """
    counts = dict.fromkeys(TCP_STATES.values(), 0)
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as fh:
                next(fh, None)  # header
                for line in fh:
                    state = TCP_STATES.get(line.split(None, 4)[3])
                    if state:
                        counts[state] += 1
            found = True
        except FileNotFoundError:
            continue
    if not found:  # not Linux
        for conn in psutil.net_connections(kind="tcp"):
            state = _PSUTIL_TCP_STATES.get(conn.status)
            if state:
                counts[state] += 1
    return counts


def tcp_summary() -> dict[str, int]:
    """established and time_wait from kernel counters, in microseconds whatever the load.

    established is the TCP MIB's CurrEstab (/proc/net/snmp, IPv4 and IPv6), which
    counts ESTABLISHED and CLOSE_WAIT; time_wait is /proc/net/sockstat's tw.
    """
    try:
        with open("/proc/net/snmp", encoding="ascii") as fh:
            tcp = [line.split() for line in fh if line.startswith("Tcp:")]
        established = int(tcp[1][tcp[0].index("CurrEstab")])
        with open("/proc/net/sockstat", encoding="ascii") as fh:
            fields = next(line.split() for line in fh if line.startswith("TCP:"))
        time_wait = int(fields[fields.index("tw") + 1])
    except (OSError, ValueError, IndexError, StopIteration):
        detail = tcp_states()
        return {"established": detail["established"] + detail["close_wait"],
                "time_wait": detail["time_wait"]}
    return {"established": established, "time_wait": time_wait}


@dataclass
class Filesystem:
    mountpoint: str
    total: int
    free: int
    used: int

    @property
    def usage_ratio(self) -> float:
        # as df: used / (used + available to unprivileged users)
        usable = self.used + self.free
        return self.used / usable if usable else 0.0


class SystemSampler:
    """Reads the host through psutil, applying the system collector's filters."""

    def __init__(self, monitoring: dict[str, Any]):
        settings = monitoring["system"]
        self.fs_types_exclude = set(settings["filesystem_types_exclude"])
        self.mounts_exclude = re.compile(settings["mountpoints_exclude"])
        self.disks_exclude = re.compile(settings["disk_devices_exclude"])
        self.nics_exclude = re.compile(settings["network_devices_exclude"])
        self.tcp_state_detail = bool(settings["tcp_state_detail"])

    def filesystems(self) -> list[Filesystem]:
        out, seen = [], set()
        for part in psutil.disk_partitions(all=False):
            mp = part.mountpoint
            if mp in seen or part.fstype in self.fs_types_exclude or self.mounts_exclude.search(mp):
                continue
            seen.add(mp)
            try:
                usage = psutil.disk_usage(mp)
            except OSError:
                continue  # unmounted or unreadable since listed
            out.append(Filesystem(mp, usage.total, usage.free, usage.used))
        return out

    def memory_usage_ratio(self) -> float:
        mem = psutil.virtual_memory()
        return 1.0 - mem.available / mem.total if mem.total else 0.0

    def snapshot(self, cpu: CpuUsage) -> dict[str, Any]:
        """The small summary the monitoring history and the health check keep."""
        load1, load5, load15 = os.getloadavg()
        return {
            "cpu_usage_ratio": round(cpu.ratio(), 4),
            "memory_usage_ratio": round(self.memory_usage_ratio(), 4),
            "load1": load1,
            "load5": load5,
            "load15": load15,
            "disk_usage_ratio": {fs.mountpoint: round(fs.usage_ratio, 4)
                                 for fs in self.filesystems()},
            "tcp_established": tcp_summary()["established"],
        }


class SystemCollector:
    name = "system"

    def __init__(self, monitoring: dict[str, Any]):
        self.sampler = SystemSampler(monitoring)
        self.cpu = CpuUsage()

    def collect(self) -> Iterator[Metric]:
        yield from self._cpu()
        yield from self._memory()
        yield from self._filesystems()
        yield from self._disk_io()
        yield from self._network()
        states = catalogue.family("a3mailer_system_tcp_connections")
        counts = tcp_states() if self.sampler.tcp_state_detail else tcp_summary()
        for state, count in counts.items():
            states.add_metric([state], count)
        yield states
        boot = psutil.boot_time()
        yield catalogue.single("a3mailer_system_boot_time_seconds", boot)
        yield catalogue.single("a3mailer_system_uptime_seconds", max(0.0, time.time() - boot))

    def _cpu(self) -> Iterator[Metric]:
        yield catalogue.single("a3mailer_system_cpu_usage_ratio", self.cpu.ratio())
        times = psutil.cpu_times()
        seconds = catalogue.family("a3mailer_system_cpu_seconds_total")
        for mode in CPU_MODES:
            if hasattr(times, mode):
                seconds.add_metric([mode], getattr(times, mode))
        yield seconds
        yield catalogue.single("a3mailer_system_cpus", psutil.cpu_count() or 0)
        load1, load5, load15 = os.getloadavg()
        yield catalogue.single("a3mailer_system_load1", load1)
        yield catalogue.single("a3mailer_system_load5", load5)
        yield catalogue.single("a3mailer_system_load15", load15)

    def _memory(self) -> Iterator[Metric]:
        mem = psutil.virtual_memory()
        used = mem.total - mem.available
        yield catalogue.single("a3mailer_system_memory_usage_ratio",
                              used / mem.total if mem.total else 0.0)
        yield catalogue.single("a3mailer_system_memory_total_bytes", mem.total)
        yield catalogue.single("a3mailer_system_memory_available_bytes", mem.available)
        yield catalogue.single("a3mailer_system_memory_used_bytes", used)
        swap = psutil.swap_memory()
        yield catalogue.single("a3mailer_system_swap_total_bytes", swap.total)
        yield catalogue.single("a3mailer_system_swap_used_bytes", swap.used)

    def _filesystems(self) -> Iterator[Metric]:
        ratio = catalogue.family("a3mailer_system_disk_usage_ratio")
        total = catalogue.family("a3mailer_system_disk_total_bytes")
        free = catalogue.family("a3mailer_system_disk_free_bytes")
        for fs in self.sampler.filesystems():
            ratio.add_metric([fs.mountpoint], fs.usage_ratio)
            total.add_metric([fs.mountpoint], fs.total)
            free.add_metric([fs.mountpoint], fs.free)
        yield from (ratio, total, free)

    def _disk_io(self) -> Iterator[Metric]:
        fields = {
            "a3mailer_system_disk_read_bytes_total": lambda d: d.read_bytes,
            "a3mailer_system_disk_written_bytes_total": lambda d: d.write_bytes,
            "a3mailer_system_disk_reads_completed_total": lambda d: d.read_count,
            "a3mailer_system_disk_writes_completed_total": lambda d: d.write_count,
            "a3mailer_system_disk_io_time_seconds_total":
                lambda d: getattr(d, "busy_time", 0) / 1000.0,
        }
        disks = {name: io for name, io in (psutil.disk_io_counters(perdisk=True) or {}).items()
                 if not self.sampler.disks_exclude.search(name)}
        for metric, read in fields.items():
            fam = catalogue.family(metric)
            for name, io in disks.items():
                fam.add_metric([name], read(io))
            yield fam

    def _network(self) -> Iterator[Metric]:
        fields = {
            "a3mailer_system_network_receive_bytes_total": "bytes_recv",
            "a3mailer_system_network_transmit_bytes_total": "bytes_sent",
            "a3mailer_system_network_receive_packets_total": "packets_recv",
            "a3mailer_system_network_transmit_packets_total": "packets_sent",
            "a3mailer_system_network_receive_errors_total": "errin",
            "a3mailer_system_network_transmit_errors_total": "errout",
            "a3mailer_system_network_receive_drops_total": "dropin",
            "a3mailer_system_network_transmit_drops_total": "dropout",
        }
        nics = {name: io for name, io in psutil.net_io_counters(pernic=True).items()
                if not self.sampler.nics_exclude.search(name)}
        for metric, attr in fields.items():
            fam = catalogue.family(metric)
            for name, io in nics.items():
                fam.add_metric([name], getattr(io, attr))
            yield fam
