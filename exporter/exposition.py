"""Renders metric families as Prometheus text format 0.0.4 or OpenMetrics 1.0.

Same output as prometheus_client's two generate_latest functions (label order
aside), written for speed: our names are always legacy-valid, so there is no
per-sample name check or label-name escaping, and label values are escaped only
when they hold a character that needs it. Prometheus 2.x asks for OpenMetrics
first, so both formats are on the hot path. benchmarks/bench_scrape.py measures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.core import Metric

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_TYPE_MAP = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
             "unknown": "untyped"}
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _number(value: float) -> str:
    if value.__class__ is not float:
        value = float(value)
    if value - value == 0.0:  # finite
        return repr(value)
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def _labelset(labels: dict[str, str]) -> str:
    return ",".join([f'{k}="{_escape(v)}"' for k, v in labels.items()])


def render_text(families: Iterable[Metric]) -> bytes:
    out: list[str] = []
    append = out.append
    for family in families:
        name, kind = family.name, family.type
        if kind == "counter":
            exposed = name + "_total"
        elif kind == "info":
            exposed = name + "_info"
        else:
            exposed = name
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {exposed} {doc}\n# TYPE {exposed} {_TYPE_MAP.get(kind, kind)}\n")
        deferred: dict[str, list[str]] = {}
        for sample in family.samples:
            sname, labels, ts = sample.name, sample.labels, sample.timestamp
            if labels:
                line = f"{sname}{{{_labelset(labels)}}} {_number(sample.value)}"
            else:
                line = f"{sname} {_number(sample.value)}"
            if ts is not None:
                line += f" {int(float(ts) * 1000):d}"
            if sname.endswith(_OM_ONLY_SUFFIXES) and sname[len(name):] in _OM_ONLY_SUFFIXES:
                deferred.setdefault(sname[len(name):], []).append(line + "\n")
            else:
                append(line + "\n")
        for suffix, lines in sorted(deferred.items()):
            append(f"# HELP {name}{suffix} {doc}\n# TYPE {name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def render_openmetrics(families: Iterable[Metric]) -> bytes:
    """OpenMetrics 1.0 text, with exemplars (e.g. trace_id on latency buckets)."""
    out: list[str] = []
    append = out.append
    for family in families:
        name = family.name
        doc = _escape(family.documentation)
        append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
        if family.unit:
            append(f"# UNIT {name} {family.unit}\n")
        for sample in family.samples:
            labels = sample.labels
            if labels:
                line = f"{sample.name}{{{_labelset(labels)}}} {_number(sample.value)}"
            else:
                line = f"{sample.name} {_number(sample.value)}"
            if sample.timestamp is not None:
                line += f" {sample.timestamp}"
            exemplar = sample.exemplar
            if exemplar:
                line += f" # {{{_labelset(exemplar.labels)}}} {_number(exemplar.value)}"
                if exemplar.timestamp is not None:
                    line += f" {exemplar.timestamp}"
            append(line + "\n")
    append("# EOF\n")
    return "".join(out).encode("utf-8")
