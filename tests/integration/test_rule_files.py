"""The generated rule files and Alertmanager example, checked by Prometheus's own tools:
promtool check rules, the hand-written promtool unit tests in alert-rules/tests/ (which must
cover every alert firing and not firing), and amtool check-config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.integration.components import require_binary

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = [ROOT / "alert-rules/alerts.yaml", ROOT / "alert-rules/recording-rules.yaml"]
TESTS = sorted((ROOT / "alert-rules/tests").glob("*.test.yaml"))
ANNOTATIONS = {"summary", "description", "runbook_url", "dashboard_url"}


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def test_promtool_check_rules():
    result = run(require_binary("promtool"), "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_pass():
    assert TESTS
    result = run(require_binary("promtool"), "test", "rules", *TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TESTS)


def test_every_alert_has_a_firing_and_a_quiet_case_with_everything_asserted():
    rules = {}
    for group in yaml.safe_load((ROOT / "alert-rules/alerts.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            rules.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    fired: dict[str, set[str]] = {}
    quiet: set[str] = set()
    for path in TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                name = check["alertname"]
                if not check.get("exp_alerts"):
                    quiet.add(name)
                for alert in check.get("exp_alerts") or []:
                    assert set(alert["exp_annotations"]) == ANNOTATIONS, (path.name, name)
                    assert "severity" in alert["exp_labels"], (path.name, name)
                    fired.setdefault(name, set()).add(alert["exp_labels"]["severity"])
    for name, severities in rules.items():
        assert fired.get(name) == severities, f"{name}: no firing case for {severities}"
        assert name in quiet, f"{name}: no case where it does not fire"


def test_amtool_checks_the_alertmanager_example():
    result = run(require_binary("amtool"), "check-config",
                 ROOT / "alert-rules/alertmanager.example.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "2 inhibit rules" in result.stdout
    assert "5 receivers" in result.stdout
