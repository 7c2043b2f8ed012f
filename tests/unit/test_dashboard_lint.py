"""Lint of the generated Grafana dashboards (the committed dashboards/*.json): what current
Grafana (10 and later) needs and what the project's dashboards promise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exporter.config import load_config
from exporter.generate import dashboards
from exporter.generate.values import lookup

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "dashboards").glob("*.json"))
ALLOWED = {"timeseries", "stat", "gauge", "bargauge", "table", "state-timeline"}
DEPRECATED = {"graph", "singlestat", "table-old", "grafana-piechart-panel", "text", "heatmap",
              "grafana-worldmap-panel", "natel-discrete-panel", "alertlist"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RANGE = re.compile(r"\[([^\]]+)\]")


@pytest.fixture(params=FILES, ids=[f.stem for f in FILES])
def board(request: pytest.FixtureRequest) -> dict:
    return dict(json.loads(request.param.read_text()))


def visual(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_one_file_per_dashboard():
    assert [f.stem for f in FILES] == sorted(dashboards.KEYS)
    assert len(FILES) == 6


def test_schema_uid_title_links(board):
    assert board["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    key = next(d.key for d in dashboards.DASHBOARDS if d.title == board["title"])
    assert board["uid"] == f"a3mailer-{key}"  # stable: derived from the name
    assert board["title"].startswith("A3Mailer / ")
    assert board["description"]
    [link] = board["links"]
    assert link["type"] == "dashboards" and link["tags"] == ["a3mailer-exporter"]
    assert link["includeVars"] and link["keepTime"]
    assert "a3mailer-exporter" in board["tags"]


def test_variables(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert list(variables) == ["datasource", "cluster", "namespace", "instance"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "namespace", "instance"):
        var = variables[name]
        assert var["datasource"] == DATASOURCE
        assert var["includeAll"] and var["allValue"] == ".*"
        assert var["query"].startswith("label_values(a3mailer_exporter_build_info{")
        assert var["query"].endswith(f", {name})")
    assert variables["cluster"]["hide"] == 2  # optional: hidden unless multi_cluster
    assert variables["namespace"]["hide"] == variables["instance"]["hide"] == 0


def test_panels_have_type_unit_description_and_datasource(board):
    for panel in visual(board):
        where = f"{board['title']}: {panel['title']}"
        assert panel["type"] in ALLOWED and panel["type"] not in DEPRECATED, where
        assert panel["description"].strip(), where
        assert panel["fieldConfig"]["defaults"].get("unit"), where
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, where
            assert target["expr"].strip(), where
        assert "options" in panel and "fieldOptions" not in panel["options"], where


def test_rates_use_rate_interval_and_queries_use_the_variables(board):
    for panel in visual(board):
        for target in panel["targets"]:
            expr = target["expr"]
            for window in RANGE.findall(expr):
                assert window == "$__rate_interval", (panel["title"], expr)
            assert 'instance=~"$instance"' in expr, (panel["title"], expr)
            assert 'cluster=~"$cluster"' in expr and 'namespace=~"$namespace"' in expr


def test_unique_ids_and_no_overlapping_grid(board):
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["w"] > 0 and pos["h"] > 0, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


def test_threshold_steps_come_from_the_config(board):
    config = load_config()
    tables = {p.title + p.description: p for d in dashboards.DASHBOARDS for r in d.rows
              for p in r.panels}
    with_threshold = 0
    for panel in visual(board):
        table = tables[panel["title"] + panel["description"]]
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0]["value"] is None
        if table.threshold:
            with_threshold += 1
            assert lookup(config, table.threshold) in [s["value"] for s in steps]
            if panel["type"] == "timeseries":
                assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"] == {
                    "mode": "line"}
        else:
            assert len(steps) == 1
    if board["uid"] in ("a3mailer-system", "a3mailer-mail", "a3mailer-security"):
        assert with_threshold >= 3


def test_threshold_panels_show_per_instance_series(board):
    """A threshold is per instance (what its alerts compare), so a panel draws it only over
    series of one instance each: a sum over 3 hosts would cross a per-host threshold."""
    from exporter.generate import promql

    for panel in visual(board):
        if len(panel["fieldConfig"]["defaults"]["thresholds"]["steps"]) == 1:
            continue
        for target in panel["targets"]:
            assert promql.per_instance(target["expr"]), (panel["title"], target["expr"])


def test_per_instance_reads_the_aggregations():
    from exporter.generate import promql

    per_instance = [
        'a3mailer_system_cpu_usage_ratio{job="a"} * 100',
        "max(a3mailer_system_cpu_usage_ratio) * 100",  # the busiest host's value
        'sum by (instance) (rate(a3mailer_x_total{result="failure"}[5m])) * 60',
        "sum by (instance, scope) (a3mailer_y)",
        "sum without (scope) (a3mailer_y)",
        "histogram_quantile(0.95, sum by (le, instance) (rate(a3mailer_z_bucket[5m])))",
        "instance:a3mailer_exporter_http_errors:ratio_rate5m * 100",
        "rate(a3mailer_a_sum[5m]) / rate(a3mailer_a_count[5m])",
    ]
    fleet = [
        'sum(rate(a3mailer_x_total{result="failure"}[5m])) * 60',
        "sum by (scope) (a3mailer_y)",
        "sum without (instance) (a3mailer_y)",
        "avg(a3mailer_y)",
        "count by (job) (up)",
        "histogram_quantile(0.95, sum by (le) (rate(a3mailer_z_bucket[5m])))",
    ]
    assert [e for e in per_instance if not promql.per_instance(e)] == []
    assert [e for e in fleet if promql.per_instance(e)] == []


def test_security_and_performance_rows_are_appendable():
    rows = dashboards.SECURITY_ROWS
    before = len(rows)
    rows.append(dashboards.Row("MFA", (dashboards.Panel(
        "MFA", "timeseries", "short", "d", (dashboards.q("up{<<sel>>}"),)),)))
    try:
        from exporter.generate import grafana

        data = json.loads(grafana.dashboard_json(load_config(), "security"))
        assert [p["title"] for p in data["panels"] if p["type"] == "row"][-1] == "MFA"
    finally:
        del rows[before:]
