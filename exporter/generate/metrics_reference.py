"""Writes docs/metrics.md from the metric catalogue."""

from __future__ import annotations

from itertools import groupby

from exporter import catalogue


def metrics_md() -> str:
    out = [
        "# Metrics reference",
        "",
        "<!-- GENERATED from exporter/catalogue.py by `a3mailer-exporter generate`: "
        "do not edit. -->",
        "",
        "Every metric the exporter emits. No label ever carries a user name, an e-mail "
        "address or an IP address. Metrics declared in `monitoring.custom_metrics` are "
        f"exported as `{catalogue.CUSTOM_PREFIX}<name>` (counters end in `_total`).",
        "",
    ]
    specs = sorted(catalogue.METRICS.values(), key=lambda s: (s.source, s.name))
    for source, group in groupby(specs, key=lambda s: s.source):
        out += [f"## {source}", "", "| metric | type | unit | labels | help |",
                "| --- | --- | --- | --- | --- |"]
        for spec in group:
            labels = ", ".join(f"`{label}`" for label in spec.labels)
            out.append(f"| `{spec.name}` | {spec.type} | {spec.unit} | {labels} | {spec.help} |")
        out.append("")
    return "\n".join(out)
