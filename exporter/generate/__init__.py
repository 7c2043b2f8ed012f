"""Everything generated from the config schema, the loaded config and the metric catalogue.

`a3mailer-exporter generate` writes these files; `--check` compares instead and
names the stale ones. Generated files are never edited by hand. The embedded
defaults are rendered first, so the bundle is always built from the current
schema's defaults merged with the given config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from exporter.config import DEFAULTS_PATH, Config, load_config
from exporter.config.loader import _defaults
from exporter.generate import (
    alertmanager,
    alerts,
    config_reference,
    dashboards,
    helm,
    helm_bundle,
    metrics_reference,
)
from exporter.generate.yaml_dump import dump_yaml

RULES_HEADER = (
    "# GENERATED from exporter/generate/alerts.py, the config and the metric catalogue by\n"
    "# `a3mailer-exporter generate`: do not edit. Thresholds: monitoring.alert_thresholds.*;\n"
    "# selector, labels, URLs and per-alert overrides: alerting.*.\n"
)


def _yaml(data: object) -> str:
    return RULES_HEADER + dump_yaml(data)


def alerts_yaml(config: Config) -> str:
    return _yaml(alerts.render_rules(config))


def recording_rules_yaml(config: Config) -> str:
    return _yaml(alerts.render_recording_rules(config))


def _dashboard(key: str) -> Callable[[Config], str]:
    def render(config: Config) -> str:
        from exporter.generate import grafana  # grafanalib: only when dashboards are built

        return grafana.dashboard_json(config, key)

    return render


def _chart_file(render: Callable[[], str]) -> Callable[[Config], str]:
    return lambda config: render()


# output path (relative to the project root) -> function that renders it from the config
OUTPUTS: dict[str, Callable[[Config], str]] = {
    "exporter/config/defaults.yaml": lambda config: config_reference.defaults_yaml(),
    "docs/configuration.md": lambda config: config_reference.configuration_md(),
    "docs/metrics.md": lambda config: metrics_reference.metrics_md(),
    "alert-rules/alerts.yaml": alerts_yaml,
    "alert-rules/recording-rules.yaml": recording_rules_yaml,
    "alert-rules/alertmanager.example.yml": alertmanager.alertmanager_yml,
    **{f"dashboards/{key}.json": _dashboard(key) for key in dashboards.KEYS},
    # --- Helm chart (exporter/generate/helm.py, helm_bundle.py): independent of --config,
    # the chart fills its rules and dashboards from the release's values
    **{path: _chart_file(render) for path, render in {
        f"{helm.CHART_DIR}/values.yaml": helm.values_yaml,
        f"{helm.CHART_DIR}/values.schema.json": helm.values_schema_json,
        **helm_bundle.outputs()}.items()},
}
DEFAULTS = "exporter/config/defaults.yaml"


def generate(out_dir: Path, check: bool = False, config_path: str | Path | None = None
             ) -> list[str]:
    """Writes (or, with check, compares) every output; returns the stale or written paths.

    Raises ConfigError when the config file is invalid.
    """
    changed = []
    defaults = config_reference.defaults_yaml()
    target = out_dir / DEFAULTS
    if (not check and target.resolve() == DEFAULTS_PATH.resolve()
            and DEFAULTS_PATH.read_text(encoding="utf-8") != defaults):
        # the config below is merged over the embedded defaults: refresh them first
        DEFAULTS_PATH.write_text(defaults, encoding="utf-8")
        _defaults.cache_clear()
        changed.append(DEFAULTS)
    config = load_config(config_path)
    for rel, render in OUTPUTS.items():
        target = out_dir / rel
        content = defaults if rel == DEFAULTS else render(config)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == content:
            continue
        changed.append(rel)
        if not check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
    return changed
