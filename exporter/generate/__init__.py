"""Everything generated from the config schema, the loaded config and the metric catalogue.

`a3mailer-exporter generate` writes these files; `--check` compares instead and
names the stale ones. Generated files are never edited by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporter.generate import config_reference, helm, metrics_reference

# output path (relative to the project root) -> function that renders it
OUTPUTS: dict[str, Callable[[], str]] = {
    "exporter/config/defaults.yaml": config_reference.defaults_yaml,
    "docs/configuration.md": config_reference.configuration_md,
    "docs/metrics.md": metrics_reference.metrics_md,
    # --- Helm chart (exporter/generate/helm.py)
    f"{helm.CHART_DIR}/values.yaml": helm.values_yaml,
    f"{helm.CHART_DIR}/values.schema.json": helm.values_schema_json,
}


def generate(out_dir: Path, check: bool = False) -> list[str]:
    """Writes (or, with check, compares) every output; returns the stale or written paths."""
    changed = []
    for rel, render in OUTPUTS.items():
        target = out_dir / rel
        content = render()
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == content:
            continue
        changed.append(rel)
        if not check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
    return changed
