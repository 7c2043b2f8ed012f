"""Renders metric families as Prometheus text format 0.0.4.

Same output as prometheus_client.generate_latest (label order aside), written
for speed: our names are always legacy-valid, so there is no per-sample name
check or label-name escaping, and label values are escaped only when they hold
a character that needs it. benchmarks/bench_scrape.py measures the difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.core import Metric

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"

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
                pairs = ",".join([f'{k}="{_escape(v)}"' for k, v in labels.items()])
                line = f"{sname}{{{pairs}}} {_number(sample.value)}"
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
