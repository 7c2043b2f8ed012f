"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from exporter.config import load_config
from exporter.service import Exporter


@pytest.fixture
def config_file(tmp_path: Path):
    """Writes a YAML config (text or dict) with a private state dir; returns its path."""

    def write(content: str | dict | None = None, name: str = "config.yaml") -> Path:
        data = content if isinstance(content, dict) else (
            yaml.safe_load(textwrap.dedent(content or "")) or {})
        data.setdefault("server", {}).setdefault("state_dir", str(tmp_path / "state"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def make_exporter(config_file):
    """An Exporter (engines only, no server) built from a config."""

    def build(content: str | dict | None = None) -> Exporter:
        exporter = Exporter(load_config(config_file(content)))
        exporter.state_dir.mkdir(parents=True, exist_ok=True)
        return exporter

    return build


@pytest.fixture
def exporter_process(tmp_path: Path):
    """Starts the real exporter (`python -m exporter run`) and always stops it."""
    from tests.exporter_process import ExporterProcess

    started: list[ExporterProcess] = []

    def start(config: Path | None = None, **kwargs) -> ExporterProcess:
        workdir = tmp_path / f"exporter{len(started)}"
        workdir.mkdir()
        proc = ExporterProcess(workdir, config, **kwargs)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()
