"""Builds the Grafana dashboard JSON of the `dashboards.py` tables with grafanalib.

grafanalib 0.7.1 builds the dashboard, the variables, the links, the targets and
the timeseries, stat, table and state-timeline panels. Its `GaugePanel` and
`BarGauge` still write Grafana 6's layout (`options.fieldOptions`, reduce options
under `fieldConfig`), which current Grafana migrates over the panel's own field
config, so `Gauge` and `BarGauge` here are grafanalib panels that write the
layout of Grafana 8 and later. Panel ids count up in table order and positions
flow left to right in rows of 24 columns, so the output is the same on every run.
"""

from __future__ import annotations

import json
from typing import Any

import attr
from grafanalib import core
from grafanalib._gen import DashboardEncoder

from exporter.config import Config
from exporter.generate import promql
from exporter.generate.dashboards import DASHBOARDS, KINDS, STATES, Dashboard, Panel, uid
from exporter.generate.values import lookup

SCHEMA_VERSION = 39  # Grafana 10.x
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TAG = "a3mailer-exporter"
ROW_HEIGHT = 1
GRID_WIDTH = 24


@attr.s
class Gauge(core.Panel):
    """A gauge panel in Grafana 8+ layout (grafanalib's GaugePanel writes Grafana 6's)."""

    unit: str = attr.ib(default="")
    mappings: list[dict[str, Any]] = attr.ib(factory=list)
    min: float | None = attr.ib(default=None)
    max: float | None = attr.ib(default=None)
    kind = "gauge"

    def options(self) -> dict[str, Any]:
        return {"showThresholdLabels": False, "showThresholdMarkers": True}

    def to_json_data(self) -> dict[str, Any]:
        return self.panel_json({
            "fieldConfig": {"defaults": {"unit": self.unit, "min": self.min, "max": self.max,
                                         "mappings": self.mappings}, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "orientation": "auto", **self.options()},
            "type": self.kind,
        })


@attr.s
class BarGauge(Gauge):
    """A bar gauge panel in Grafana 8+ layout (grafanalib's BarGauge writes Grafana 6's)."""

    kind = "bargauge"

    def options(self) -> dict[str, Any]:
        return {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True}


def _steps(config: Config, panel: Panel) -> list[dict[str, Any]]:
    if not panel.threshold:
        return [{"color": "green", "value": None}]
    red = lookup(config, panel.threshold)
    if panel.below:
        steps = [{"color": "red", "value": None}, {"color": "orange", "value": red}]
        if panel.warning:
            steps.append({"color": "green", "value": lookup(config, panel.warning)})
        return steps
    steps = [{"color": "green", "value": None}]
    if panel.warning:
        steps.append({"color": "orange", "value": lookup(config, panel.warning)})
    steps.append({"color": "red", "value": red})
    return steps


def _mappings(panel: Panel) -> list[dict[str, Any]]:
    if not panel.states:
        return []
    return [{"type": "value", "options": {
        str(value): {"text": text, "color": color, "index": index}
        for index, (value, text, color) in enumerate(STATES[panel.states])}}]


VARIABLES = 'cluster=~"$cluster", namespace=~"$namespace", instance=~"$instance"'


def selector(config: Config) -> str:
    """The dashboards' matchers: alerting.selector and the template variables."""
    return f'{config["alerting"]["selector"]}, {VARIABLES}'


def _panel(config: Config, panel: Panel, pid: int, pos: core.GridPos) -> Any:
    tokens = {"sel": selector(config), "vars": VARIABLES, "by": promql.BY}
    targets = [core.Target(expr=promql.fill(query.expr, tokens), legendFormat=query.legend,
                           refId=chr(ord("A") + index), datasource=DATASOURCE,
                           instant=query.instant, intervalFactor=1,
                           format="table" if panel.kind == "table" else "time_series")
               for index, query in enumerate(panel.queries)]
    common = {"title": panel.title, "description": panel.description, "id": pid,
              "dataSource": DATASOURCE, "targets": targets, "gridPos": pos,
              "thresholds": _steps(config, panel), "maxDataPoints": None}
    limits = {"min": panel.min, "max": panel.max}
    if panel.kind == "timeseries":
        return core.TimeSeries(**common, unit=panel.unit, mappings=_mappings(panel),
                               thresholdsStyleMode="line" if panel.threshold else "off",
                               legendDisplayMode="list", tooltipMode="multi",
                               extraJson={"fieldConfig": {"defaults": limits}})
    if panel.kind == "stat":
        return core.Stat(**common, format=panel.unit, mappings=_mappings(panel),
                         reduceCalc="lastNotNull", graphMode="area", colorMode="value",
                         noValue="no data", extraJson={"fieldConfig": {"defaults": limits}})
    if panel.kind == "gauge":
        return Gauge(**common, unit=panel.unit, mappings=_mappings(panel), **limits)
    if panel.kind == "bargauge":
        return BarGauge(**common, unit=panel.unit, mappings=_mappings(panel), **limits)
    if panel.kind == "table":
        return core.Table(**common, unit=panel.unit, mappings=_mappings(panel),
                          displayMode="color-text",
                          transformations=[{"id": "organize", "options": {
                              "excludeByName": {"Time": True, "__name__": True}}}],
                          extraJson={"fieldConfig": {"defaults": {
                              "mappings": _mappings(panel)}}})
    if panel.kind == "state-timeline":
        return core.StateTimeline(**common, mappings=_mappings(panel), showValue="never",
                                  extraJson={"fieldConfig": {"defaults": {
                                      "unit": panel.unit, "min": 0, "max": 1,
                                      "thresholds": {"mode": "absolute",
                                                     "steps": _steps(config, panel)}}}})
    raise ValueError(f"{panel.title}: unknown panel kind {panel.kind!r} (one of {KINDS})")


def _variable(config: Config, name: str, label: str, filters: str, hidden: bool) -> Any:
    sel = config["alerting"]["selector"] + filters
    return core.Template(name=name, label=label, dataSource=DATASOURCE,
                         query=f"label_values(a3mailer_exporter_build_info{{{sel}}}, {name})",
                         includeAll=True, multi=True, allValue=".*", default="$__all",
                         refresh=2, sort=1, hide=2 if hidden else 0)


def build(config: Config, board: Dashboard) -> Any:
    """The grafanalib Dashboard of one table entry: ids, positions and steps assigned."""
    panels: list[Any] = []
    pid, y = 1, 0
    for row in board.rows:
        panels.append(core.RowPanel(title=row.title, id=pid,
                                    gridPos=core.GridPos(h=ROW_HEIGHT, w=GRID_WIDTH, x=0, y=y)))
        pid, y = pid + 1, y + ROW_HEIGHT
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel(config, panel, pid,
                                 core.GridPos(h=panel.height, w=panel.width, x=x, y=y)))
            pid, x, line_height = pid + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    dash = config["dashboards"]
    variables = [
        core.Template(name="datasource", label="Data source", type="datasource",
                      query="prometheus", default="default", refresh=1),
        _variable(config, "cluster", "Cluster", "", not dash["multi_cluster"]),
        _variable(config, "namespace", "Namespace", ', cluster=~"$cluster"', False),
        _variable(config, "instance", "Instance",
                  ', cluster=~"$cluster", namespace=~"$namespace"', False),
    ]
    return core.Dashboard(
        title=board.title, description=board.description, uid=uid(config, board.key),
        tags=[TAG], timezone="browser", refresh=dash["refresh"], editable=True,
        schemaVersion=SCHEMA_VERSION, graphTooltip=1, panels=panels,
        time=core.Time("now-6h", "now"), templating=core.Templating(list=variables),
        links=[core.DashboardLink(title="A3Mailer dashboards", type="dashboards", tags=[TAG],
                                  asDropdown=True, includeVars=True, keepTime=True)])


def dashboard_json(config: Config, key: str) -> str:
    board = next(d for d in DASHBOARDS if d.key == key)
    data = build(config, board).to_json_data()
    return json.dumps(data, cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"
