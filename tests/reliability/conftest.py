"""The reliability suite: load, attack, crash, dependency faults, config reloads, fuzzing
and security checks, against the real exporter process and real components.

`make test` runs the short mode; `make reliability` the long one
(RELIABILITY_MODE=long), which also records its figures into
benchmarks/results/reliability.json for benchmarks/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.exporter_process import ROOT
from tests.integration.conftest import (  # noqa: F401 - the real components' fixtures
    alertmanager,
    client_ip,
    dovecot,
    dovecot_factory,
    mail_stack,
    prometheus_factory,
    redis_server,
)

LONG = os.environ.get("RELIABILITY_MODE") == "long"
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"
LONG_TIMEOUT = 1800  # seconds per test in the long mode


def scale(short: Any, long: Any) -> Any:
    """The short-mode figure, or the long one under `make reliability`."""
    return long if LONG else short


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if item.path.resolve().is_relative_to(here):
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.integration)
            if LONG:  # minutes of load or a million addresses: beyond the suite's 300 s
                item.add_marker(pytest.mark.timeout(LONG_TIMEOUT))


@pytest.fixture(scope="session")
def record() -> Iterator[dict[str, Any]]:
    """Figures a test wants in RELIABILITY.md: record[name] = {...}. Written in long mode."""
    figures: dict[str, Any] = {}
    yield figures
    if LONG and figures:
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        runs = previous.get("runs", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        runs.update({name: {**value, "recorded": stamp, "load_average_at_end": load}
                     for name, value in figures.items()})
        machine = {"cpu": _cpu_model(), "cores": os.cpu_count(),
                   "python": platform.python_version()}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"machine": machine, "runs": runs}, indent=2,
                                      sort_keys=True) + "\n")


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        return next((line.split(":", 1)[1].strip() for line in fh
                     if line.startswith("model name")), platform.machine())
