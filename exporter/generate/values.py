"""How a threshold gets into a generated rule: a value renderer.

A rule names the config key path of its threshold (e.g.
`monitoring.alert_thresholds.cpu_usage_threshold`); a renderer turns the path into
the text written into the expression. `configured(config)` writes the configured
number, so `a3mailer-exporter generate` bakes the YAML's values in; `helm_template`
writes a Helm template expression instead, so a chart can render the same rules
with the values given at `helm upgrade` time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter.config import Config

ValueRenderer = Callable[[str], str]


def lookup(config: Config, path: str) -> Any:
    """The value at a dotted key path of the loaded config."""
    value: Any = config.data
    for key in path.split("."):
        value = value[key]
    return value


def number(value: float) -> str:
    """A number as PromQL and YAML both read it, the same way on every run (80, 0.5)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def configured(config: Config) -> ValueRenderer:
    """Writes the configured number of each key path."""
    return lambda path: number(lookup(config, path))


def helm_template(root: str = ".Values.config") -> ValueRenderer:
    """Writes `{{ <root>.<path> }}`, for a chart whose values hold the config at `root`."""
    return lambda path: "{{ " + f"{root}.{path}" + " }}"
