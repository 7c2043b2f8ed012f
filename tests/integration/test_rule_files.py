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


def test_rules_with_a_family_disabled_load_and_the_other_families_still_pass(tmp_path):
    """alerting.alerts disabling every system alert: the file has no system group, promtool
    loads it, and the other families' unit tests pass against it unchanged."""
    from exporter.cli import main
    from exporter.generate import alerts

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"alerting": {"alerts": {
        a.name: {"enabled": False} for a in alerts.ALERTS if a.family == "system"}}}))
    assert main(["generate", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    rules = [tmp_path / "out/alert-rules" / p.name for p in RULE_FILES]
    groups = yaml.safe_load(rules[0].read_text())["groups"]
    assert "a3mailer-system" not in {g["name"] for g in groups} and all(
        g["rules"] for g in groups)
    promtool = require_binary("promtool")
    checked = run(promtool, "check", "rules", *rules)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    others = [p for p in TESTS if not p.name.startswith("system.")]
    copies = []
    for path in others:
        case = yaml.safe_load(path.read_text())
        case["rule_files"] = [str(r) for r in rules]
        copies.append(tmp_path / path.name)
        copies[-1].write_text(yaml.safe_dump(case, sort_keys=False))
    tested = run(promtool, "test", "rules", *copies)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(others) == len(TESTS) - 1
