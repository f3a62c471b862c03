"""The recording and alerting rules, checked by Prometheus's own ``promtool``: syntax, the sample config, and the
``promtool test rules`` unit tests in which every alert fires where it should and stays quiet where it should not.

promtool comes from Debian's ``prometheus`` package (scripts/setup.sh); without it these tests fail in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts import gen_dashboards as gen

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / gen.RULES_PATH
RULE_TESTS = RULES.with_name("roma-otel.rules.test.yml")
PROMETHEUS_CONFIG = ROOT / "prometheus" / "prometheus.yml"
DASHBOARDS = [ROOT / gen.OVERVIEW_PATH, ROOT / gen.TOOLS_PATH]

ALERTS = {
    "RomaRunCostHigh",
    "RomaRunSlow",
    "RomaTaskFailureRateHigh",
    "RomaToolSuccessRateLow",
    "RomaToolLatencyP95Rising",
    "RomaToolErrorRateSpike",
    "RomaToolkitCacheHitRateDropping",
}


def find_binary(name: str, env: str) -> str:
    """The binary from ``$env`` or PATH; a missing one fails in CI and skips (with the reason) elsewhere."""
    path = os.environ.get(env) or shutil.which(name)
    if path:
        return path
    message = f"{name} not found (set {env} or run scripts/setup.sh, which installs Debian's prometheus package)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def promtool() -> str:
    return find_binary("promtool", "PROMTOOL_BIN")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in load_rules() if "alert" in rule}


# --- the rules file ----------------------------------------------------------------------------------------
def test_committed_rules_equal_the_generator_output() -> None:
    assert RULES.read_text(encoding="utf-8") == gen.render()[gen.RULES_PATH], (
        "prometheus/rules/roma-otel.rules.yml is out of date: run python scripts/gen_dashboards.py"
    )


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_sample_prometheus_config_is_valid_and_loads_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert (PROMETHEUS_CONFIG.parent / config["rule_files"][0]).resolve() == RULES
    targets = [t for job in config["scrape_configs"] for static in job["static_configs"] for t in static["targets"]]
    assert targets == ["127.0.0.1:9464"]  # the demo's endpoint


def test_promtool_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- the alerts: the seven of the issue, each with severity and what to look at -------------------------------
def test_the_seven_alerts_have_a_severity_and_say_what_to_look_at() -> None:
    found = alerts()
    assert set(found) == ALERTS
    titles = {panel["title"] for path in DASHBOARDS for panel in json.loads(path.read_text())["panels"]}
    uids = {json.loads(path.read_text())["uid"] for path in DASHBOARDS}
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and "{{ $labels." in annotations["summary"], name
        description = annotations["description"]
        assert "Look at" in description, name
        # Every panel it points at exists, on a dashboard that exists.
        quoted = re.findall(r'"([^"]+)"', description)
        assert quoted, name
        assert set(quoted) <= titles, (name, set(quoted) - titles)
        assert set(re.findall(r"/d/([\w-]+)", description)) <= uids, name


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        assert case["interval"] == "1m", case["name"]  # Prometheus 2.42's promtool needs it explicit
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS
    # Every recording rule's value is asserted exactly somewhere.
    evaluated = {check["expr"] for case in tests["tests"] for check in case.get("promql_expr_test", [])}
    records = {rule["record"] for rule in load_rules() if "record" in rule}
    assert records <= evaluated, records - evaluated


def test_rules_read_only_contract_series_and_recorded_rules() -> None:
    rules = load_rules()
    records = {rule["record"] for rule in rules if "record" in rule}
    allowed = gen.contract_series() | records
    for rule in rules:
        used = gen.referenced_series(rule["expr"])
        assert used, rule
        assert used <= allowed, (rule.get("record") or rule.get("alert"), used - allowed)


# --- the unit tests are not vacuous: a wrong threshold or window makes them fail --------------------------------
MUTATIONS = {
    "RomaRunCostHigh": ('le=~"5(\\\\.0)?"', 'le="5.0"'),  # the collector's le="5" would no longer match
    "RomaRunSlow": ("increase(job:executions_slower_than_300s:count[10m]) > 0 or ", ""),
    "RomaTaskFailureRateHigh": ("job:task_failure:ratio_rate5m > 0.2", "job:task_failure:ratio_rate5m > 0.05"),
    "RomaToolSuccessRateLow": ("ratio_rate5m < 0.95", "ratio_rate5m < 0.5"),
    "RomaToolLatencyP95Rising": ("and tool_name:tool_duration_ms:p95_5m > 100", ""),
    "RomaToolErrorRateSpike": ("> 3 * toolkit_class:tool_error:ratio_rate1h", "> 0"),
    "RomaToolkitCacheHitRateDropping": ("ratio_rate5m < 0.75 * toolkit_class", "ratio_rate5m < 0.95 * toolkit_class"),
}


@pytest.mark.parametrize("alert", sorted(MUTATIONS))
def test_promtool_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path, alert: str) -> None:
    old, new = MUTATIONS[alert]
    text = RULES.read_text(encoding="utf-8")
    assert old in text, old
    (tmp_path / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"the unit tests did not notice {old!r} -> {new!r}"
    assert "FAILED" in result.stdout + result.stderr
