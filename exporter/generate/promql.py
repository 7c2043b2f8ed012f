"""The small PromQL vocabulary of the rule and panel tables.

Expressions in the tables are written with three tokens, so that one definition
serves every deployment (the monitoring mixins' `%(selector)s`):

- `<<sel>>`: the label matchers of alerting.selector (dashboards add the
  $cluster, $namespace and $instance matchers);
- `<<vars>>` (dashboards): the variable matchers alone, for recorded series, which
  carry no job label;
- `<<by>>`: `cluster, namespace, instance`, what an aggregation keeps, so one rule
  set covers many instances (a missing cluster or namespace label groups as empty);
- `<<threshold>>` (alerts): the threshold, as the value renderer writes it (a
  number, or a Helm template); `<<for>>`: the alert's effective `for`.

`metric_names()` reads back which series an expression selects; the generator
checks every name against the catalogue, and the metric-contract test uses it on
the generated files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

BY = "cluster, namespace, instance"
TOKEN = re.compile(r"<<(\w+)>>")

# series Prometheus itself writes, which dashboards and rules may read
SYNTHETIC = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                       "scrape_samples_scraped"})

_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "atan2", "inf", "nan", "le", "quantile",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' r"|'(?:[^'\\]|\\.)*'")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replaces every <<token>>; an unknown token is a bug in a table, so it raises."""

    def sub(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return TOKEN.sub(sub, text)


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (metrics and recording rules).

    Strings, label matchers, ranges and grouping label lists are dropped first; what
    is left that is neither a function call, a keyword nor a number is a series name.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        name = match.group(0)
        rest = text[match.end():].lstrip()
        before = text[:match.start()]
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        if before and (before[-1].isdigit() or before[-1] == "."):
            continue  # the unit of a number like 1e3 or a duration
        names.add(name)
    return names


_AGGREGATION = re.compile(
    r"\b(sum|avg|count|group|stddev|stdvar|quantile|topk|bottomk|count_values|min|max)\s*"
    r"(?:(by|without)\s*\(([^()]*)\))?\s*\(")


def per_instance(expr: str) -> bool:
    """Whether each series of expr belongs to one instance, the unit the alerts compare
    with a threshold: every aggregation keeps `instance` (or is a max or min, the value of
    one instance). `sum(...) by (...)` written after its argument counts as dropping it."""
    for match in _AGGREGATION.finditer(_STRING.sub('""', expr)):
        operator, grouping, labels = match.groups()
        kept = {label.strip() for label in (labels or "").split(",")}
        if operator in ("max", "min") or (grouping == "by" and "instance" in kept) or (
                grouping == "without" and "instance" not in kept):
            continue
        return False
    return True


def base_metric(name: str, known: Mapping[str, object]) -> str:
    """A histogram series (_bucket, _sum, _count) as its catalogued family name."""
    if name in known:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name
