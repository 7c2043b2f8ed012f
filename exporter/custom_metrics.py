"""Metrics the mail server declares in monitoring.custom_metrics and sets over the API.

Each declaration fixes the type, the label names and a series budget, so a
caller can never grow the label set without bound. Label values that look like
an e-mail address or an IP address are refused: those belong in logs, not labels.
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from exporter import catalogue
from exporter.catalogue import MetricSpec
from exporter.instruments import CounterVec

if TYPE_CHECKING:
    from jsonschema import ValidationError

MAX_LABEL_VALUE_LENGTH = 128
_EMAIL = re.compile(r"[^@\s<>\"'(),;\[\]]+@[^@\s<>\"'(),;\[\]]+")

# The request body of POST /api/v1/metrics/custom/{name}: served in /openapi.json too.
UPDATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["value"],
    "properties": {
        "value": {"type": "number", "description": "The value to set, or the amount to add."},
        "op": {"type": "string", "enum": ["set", "inc", "dec"], "default": "set",
               "description": "set (gauges only), inc, or dec (gauges only). Counters accept "
                              "only inc with a value >= 0."},
        "labels": {"type": "object", "additionalProperties": {"type": "string"},
                   "default": {}, "description": "A value for every declared label name."},
    },
}


# the reason a body that breaks UPDATE_SCHEMA is counted under, by the key at fault
_BODY_REASONS = {"op": "wrong_type", "value": "bad_value", "labels": "bad_labels"}


def body_reason(error: ValidationError | None) -> str:
    """The rejection reason of an update body that is not JSON (None) or breaks
    UPDATE_SCHEMA: the reasons `update` counts under, `bad_body` for the rest."""
    if error is None:
        return "bad_body"
    if error.validator == "required":  # value is the one key required
        return "bad_value"
    key = error.absolute_path[0] if error.absolute_path else None
    return _BODY_REASONS.get(str(key), "bad_body")


class UpdateError(Exception):
    """An update refused; status is the HTTP status that says why."""

    def __init__(self, status: int, reason: str, code: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.code = code


@dataclass
class Declared:
    spec: MetricSpec
    max_series: int
    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.spec.type


class CustomMetrics:
    def __init__(self, declarations: list[dict[str, Any]]):
        self.metrics: dict[str, Declared] = {}
        self.rejections = CounterVec("a3mailer_exporter_custom_metric_rejections_total")
        self.configure(declarations)

    def configure(self, declarations: list[dict[str, Any]]) -> None:
        """Applies declarations (also on reload): values survive when type and labels match."""
        new: dict[str, Declared] = {}
        for decl in declarations:
            spec = catalogue.custom_spec(decl["name"], decl["type"], decl["help"],
                                         decl.get("labels", []))
            old = self.metrics.get(decl["name"])
            keep = old is not None and (old.spec.type, old.spec.labels) == (spec.type, spec.labels)
            new[decl["name"]] = Declared(spec, decl.get("max_series", 100),
                                         old.values if keep and old else {})
        self.metrics = new

    def update(self, name: str, body: dict[str, Any]) -> float:
        """Applies one validated update body; returns the series' new value."""
        metric = self.metrics.get(name)
        if metric is None:
            raise UpdateError(404, f"metric {name!r} is not declared in "
                                   "monitoring.custom_metrics", "not_declared")
        try:
            return self._apply(metric, body)
        except UpdateError as exc:
            self.count_rejection(name, exc.code)
            raise

    def count_rejection(self, name: str, reason: str) -> None:
        """Counts a refused update of a declared metric (an undeclared name is not counted:
        the label set would grow with every name a caller makes up)."""
        if name in self.metrics:
            self.rejections.inc((name, reason))

    def _apply(self, metric: Declared, body: dict[str, Any]) -> float:
        value = float(body["value"])
        if not math.isfinite(value):
            raise UpdateError(400, "value must be a finite number", "bad_value")
        op = body.get("op", "set")
        if metric.kind == "counter" and (op != "inc" or value < 0):
            raise UpdateError(400, "a counter only takes op 'inc' with a value >= 0",
                              "wrong_type")
        key = self._label_key(metric, body.get("labels", {}))
        if key not in metric.values and len(metric.values) >= metric.max_series:
            raise UpdateError(422, f"series budget of {metric.max_series} is full; "
                                   "raise max_series or reuse label values", "series_budget")
        current = metric.values.get(key, 0.0)
        new = {"set": value, "inc": current + value, "dec": current - value}[op]
        if not math.isfinite(new):  # 1e308 + 1e308: a counter would stay at +Inf for good
            raise UpdateError(400, f"the result of {op} would not be a finite number",
                              "bad_value")
        metric.values[key] = new
        return new

    @staticmethod
    def _label_key(metric: Declared, labels: dict[str, str]) -> tuple[str, ...]:
        declared = metric.spec.labels
        if set(labels) != set(declared):
            extra = sorted(set(labels) - set(declared))
            missing = sorted(set(declared) - set(labels))
            parts = [f"undeclared labels {extra}" if extra else "",
                     f"missing labels {missing}" if missing else ""]
            raise UpdateError(400, "; ".join(p for p in parts if p)
                              + f" (declared: {list(declared)})", "bad_labels")
        for name in declared:
            _check_label_value(name, labels[name])
        return tuple(labels[name] for name in declared)

    def collect(self) -> Iterator[Metric]:
        for metric in list(self.metrics.values()):
            fam = catalogue.family(metric.spec.name, metric.spec)
            for key, value in tuple(metric.values.items()):
                fam.add_metric(list(key), value)
            yield fam
        yield from self.rejections.collect()


def _check_label_value(name: str, value: str) -> None:
    if len(value) > MAX_LABEL_VALUE_LENGTH:
        raise UpdateError(400, f"label {name!r} is longer than {MAX_LABEL_VALUE_LENGTH} "
                               "characters", "bad_labels")
    if _holds_an_address(value):
        raise UpdateError(400, f"label {name!r} looks like an e-mail or IP address; those "
                               "never go into metric labels", "personal_data")


def _holds_an_address(value: str) -> bool:
    """Whether an e-mail or IP address stands anywhere in the value, also inside a longer
    text (`Alice <alice@example.org>`, `198.51.100.7:25`, `[2001:db8::7]`, `client=...`)
    and percent-encoded (`alice%40example.org`)."""
    text = urllib.parse.unquote(value)
    if _EMAIL.search(text):
        return True
    # a digit in it: `std::vector` and `Foo::Bar` hold "d::", which parses as IPv6
    return any(_is_ip(token) for token in _ADDRESS_TOKEN.findall(text)
               if any(c.isdigit() for c in token))


# candidate addresses: runs of what an IPv4 or IPv6 address (or a CIDR) is written with
_ADDRESS_TOKEN = re.compile(r"[0-9A-Fa-f.:]*[.:][0-9A-Fa-f.:]*(?:/\d{1,3})?")


# zeros that pad a number (192.168.001.001): ipaddress refuses them, inet_aton and many
# a reader take the address all the same
_PADDING_ZEROS = re.compile(r"(?<![0-9A-Fa-f])0+(?=[0-9])")


def _is_ip(value: str) -> bool:
    candidates = [value, value.strip(":."), value.rstrip(":.").rsplit(":", 1)[0]]
    candidates += [_PADDING_ZEROS.sub("", candidate) for candidate in candidates]
    for candidate in candidates:
        try:
            ipaddress.ip_network(candidate, strict=False)
        except ValueError:
            continue
        return True
    return False
