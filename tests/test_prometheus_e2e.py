"""End to end against a real Prometheus (Debian's package): it scrapes an instrumented DSPy program every second and
loads the roma-otel rules; then the seed's PromQL, every dashboard panel and variable query and every rule are
evaluated through its HTTP API. Every query must parse; every panel, seed query and recording rule must return data.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider

import roma_otel
from roma_otel import RomaInstrumentor
from roma_otel.config import default_config
from scripts import gen_dashboards as gen
from tests.conftest import answer_lm

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / gen.RULES_PATH
DASHBOARDS = [ROOT / gen.OVERVIEW_PATH, ROOT / gen.TOOLS_PATH]
SEED_DOC = ROOT.parent / "shared" / "seeds" / "000_0045d29e1cf8797e.txt"

# The seed's "Prometheus 查询示例" (monitoring and alerting section), verbatim.
SEED_QUERIES = [
    "sum(rate(tool_invocations_success_total[5m])) by (toolkit_class) / sum(rate(tool_invocations_total[5m])) by "
    "(toolkit_class)",
    "histogram_quantile(0.95, sum(rate(tool_duration_ms_bucket[5m])) by (le, tool_name))",
    "sum(rate(tool_invocations_failed_total[5m])) by (toolkit_class, error_type)",
]
# Grafana's variables as a user with every filter on "All" sees them.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$toolkit_class": ".*",
    "$tool_name": ".*",
    "$module": ".*",
}

TOOLKIT = "E2ECalcToolkit"
ROUNDS = 3  # the first creates the series, the later ones move every rate
# What this program must trigger (pending or firing): 1 tool call in 4 fails, 1 task in 3 fails.
EXPECTED_ACTIVE = {"RomaToolSuccessRateLow", "RomaTaskFailureRateHigh"}


@roma_otel.toolkit
class E2ECalcToolkit:
    def add(self, a: float, b: float) -> float:
        return a + b

    def divide(self, a: float, b: float) -> float:
        return a / b


class Planner(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict("goal -> plan")

    def forward(self, goal: str) -> dspy.Prediction:
        return self.plan(goal=goal)


class Executor(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.answer = dspy.Predict("plan -> answer")

    def forward(self, plan: str) -> dspy.Prediction:
        tools = E2ECalcToolkit()
        tools.add(1, 2)
        tools.add(2, 3)
        tools.divide(4, 2)
        try:
            tools.divide(1, 0)
        except ZeroDivisionError:
            pass
        return self.answer(plan=plan)


class Agent(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.planner = Planner()
        self.executor = Executor()

    def forward(self, goal: str) -> dspy.Prediction:
        return self.executor(plan=self.planner(goal=goal).plan)


def run_round(agent: Agent) -> None:
    """Two completed executions (one implicit) and one failed; three tasks, one failed; 8 tool calls, 2 failed;
    toolkit lifecycle events with 3 cache hits per miss."""
    with dspy.context(lm=answer_lm(plan="see the sights", answer="a fine weekend")):
        agent(goal="plan a weekend in Barcelona")
        with roma_otel.execution("weekend trip"):
            with roma_otel.task("plan and execute"):
                agent(goal="plan a weekend in Rome")
            with roma_otel.task("warm the toolkit cache"):
                roma_otel.record_toolkit_event("cache_miss", TOOLKIT, duration_ms=0.2)
                roma_otel.record_toolkit_event("create", TOOLKIT, duration_ms=3.0)
                for _ in range(3):
                    roma_otel.record_toolkit_event("cache_hit", TOOLKIT, duration_ms=0.1)
            with pytest.raises(RuntimeError), roma_otel.task("doomed step"):
                raise RuntimeError("step failed")
        with pytest.raises(RuntimeError), roma_otel.execution("doomed run"):
            raise RuntimeError("run failed")


# --- Prometheus --------------------------------------------------------------------------------------------
def prometheus_binary() -> str:
    path = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if path:
        return path
    message = "prometheus not found (set PROMETHEUS_BIN or run scripts/setup.sh, which installs Debian's prometheus)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        try:
            value = check()
        except (OSError, ValueError, KeyError, IndexError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@dataclass
class Stack:
    url: str
    at: float  # every query is evaluated at this instant: after the last scrape, while the target was up
    alerts: list[dict[str, Any]] = field(default_factory=list)
    rules: list[dict[str, Any]] = field(default_factory=list)

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400 / 422 carry the parse or evaluation error
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr, time=f"{self.at:.3f}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = prometheus_binary()
    work = tmp_path_factory.mktemp("prometheus")
    config = default_config()
    config.observability.prometheus.enabled = True
    config.observability.prometheus.port = 0
    instrumentor = RomaInstrumentor()
    instrumentor.instrument(tracer_provider=TracerProvider(), config=config)
    endpoint = instrumentor.prometheus_endpoint
    assert endpoint is not None
    (work / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "roma-otel", "static_configs": [{"targets": [f"127.0.0.1:{endpoint.port}"]}]}
                ],
            }
        )
    )
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack = Stack(url=f"http://127.0.0.1:{port}", at=0.0)
    try:

        def target_up() -> bool:
            (target,) = stack.get("/api/v1/targets")["data"]["activeTargets"]
            return target["health"] == "up"

        wait_for("the roma-otel target to be scraped", target_up, 30, proc, log)
        agent = Agent()
        for i in range(ROUNDS):
            run_round(agent)
            if i < ROUNDS - 1:
                time.sleep(2.2)  # two scrapes between rounds: every counter rises between samples

        calls = 8 * ROUNDS

        def scraped_everything() -> bool:
            result = stack.get("/api/v1/query", query=f"sum({gen.TOOL_CALLS})")["data"]["result"]
            return bool(result) and float(result[0]["value"][1]) == calls

        wait_for("the last round to be scraped", scraped_everything, 15, proc, log)
        stack.at = time.time()

        def alerts_settled() -> list[dict[str, Any]] | None:
            active = stack.get("/api/v1/alerts")["data"]["alerts"]
            return active if {a["labels"]["alertname"] for a in active} >= EXPECTED_ACTIVE else None

        stack.alerts = wait_for("the expected alerts to become active", alerts_settled, 20, proc, log)

        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = stack.get("/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            evaluated = all(not r["lastEvaluation"].startswith("0001") and r["health"] != "unknown" for r in rules)
            return rules if rules and evaluated else None

        stack.rules = wait_for("every rule to be evaluated", rules_evaluated, 15, proc, log)
        yield stack
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


# --- helpers -----------------------------------------------------------------------------------------------
def substitute(expr: str) -> str:
    for variable in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(variable, SUBSTITUTIONS[variable])
    assert "$" not in expr, expr
    return expr


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                out.append((f"{dashboard['title']} / {panel['title']} / {target['refId']}", target["expr"]))
    return out


def rule_expressions() -> list[tuple[str, str]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [(rule.get("record") or rule["alert"], rule["expr"]) for g in data["groups"] for rule in g["rules"]]


def problem(response: dict[str, Any], need_data: bool) -> str | None:
    """Why a query response is not acceptable, or None."""
    if response.get("status") != "success":
        return f"{response.get('errorType')}: {response.get('error')}"
    if not need_data:
        return None
    values = [float(sample["value"][1]) for sample in response["data"]["result"]]
    if not values:
        return "no data"
    if not any(math.isfinite(v) for v in values):
        return f"only non-finite values {values}"
    return None


def check_all(stack: Stack, queries: list[tuple[str, str]], need_data: bool) -> None:
    failures = []
    for name, expr in queries:
        reason = problem(stack.query(substitute(expr)), need_data)
        if reason:
            failures.append(f"{name}: {reason}\n    {expr}")
    assert not failures, "\n".join(failures)


# --- the checks --------------------------------------------------------------------------------------------
def test_seed_queries_return_data(stack: Stack) -> None:
    if SEED_DOC.exists():  # the constants are the seed's queries, verbatim
        text = SEED_DOC.read_text(encoding="utf-8")
        block = text.split("#### Prometheus 查询示例", 1)[1].split("```promql", 1)[1].split("```", 1)[0]
        in_doc = [" ".join(q.split()) for q in re.split(r"^#.*$", block, flags=re.MULTILINE) if q.strip()]
        assert in_doc == [" ".join(q.split()) for q in SEED_QUERIES]
    check_all(stack, [(f"seed query {i + 1}", q) for i, q in enumerate(SEED_QUERIES)], need_data=True)
    # The seed's first query gives the success rate of the toolkit: 3 calls in 4 return.
    (sample,) = stack.query(SEED_QUERIES[0])["data"]["result"]
    assert sample["metric"] == {"toolkit_class": TOOLKIT}
    assert float(sample["value"][1]) == pytest.approx(0.75)
    (failed,) = stack.query(SEED_QUERIES[2])["data"]["result"]
    assert failed["metric"] == {"toolkit_class": TOOLKIT, "error_type": "ZeroDivisionError"}


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    queries = panel_queries()
    assert len(queries) >= 25
    check_all(stack, queries, need_data=True)


def test_every_dashboard_variable_has_values(stack: Stack) -> None:
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text(encoding="utf-8"))["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            selector, label = substitute(match.group(1)), match.group(2)
            response = stack.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
            assert response["status"] == "success", response
            assert response["data"], f"{variable['name']}: no values for {variable['definition']}"


def test_every_rule_expression_parses_and_every_recording_rule_returns_data(stack: Stack) -> None:
    rules = rule_expressions()
    check_all(stack, [(n, e) for n, e in rules if ":" not in n], need_data=False)  # alerts: parse and evaluate
    check_all(stack, [(n, e) for n, e in rules if ":" in n], need_data=True)  # recording rules: data too
    # Prometheus loaded them all and evaluates them without error.
    assert {r["name"] for r in stack.rules} == {name for name, _ in rules}
    broken = {r["name"]: r.get("lastError") for r in stack.rules if r["health"] != "ok"}
    assert not broken, broken


def test_alerts_fire_exactly_where_they_should(stack: Stack) -> None:
    active = {a["labels"]["alertname"]: a for a in stack.alerts}
    assert set(active) == EXPECTED_ACTIVE, sorted(active)
    tools = active["RomaToolSuccessRateLow"]
    assert tools["labels"]["toolkit_class"] == TOOLKIT
    assert tools["labels"]["severity"] == "warning"
    assert tools["state"] in {"pending", "firing"}
    assert "of E2ECalcToolkit tool calls returned" in tools["annotations"]["description"]
    tasks = active["RomaTaskFailureRateHigh"]
    assert tasks["labels"]["job"] == "roma-otel" and tasks["labels"]["severity"] == "critical"
    assert float(tasks["value"]) == pytest.approx(1 / 3)


def test_prometheus_pointed_at_the_demo_fills_every_panel(tmp_path: Path) -> None:
    """The issue's "done when": point Prometheus at `roma-otel demo` and every panel fills."""
    binary = prometheus_binary()
    metrics_port, prometheus_port = free_port(), free_port()
    demo_log = tmp_path / "demo.log"
    with demo_log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "roma_otel.cli", "demo", "--port", str(metrics_port), "--no-postgres",
             "--repeat", "12", "--interval", "1", "--keep-serving", "90"],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "demo", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                ],
            }
        )
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    stack = Stack(url=f"http://127.0.0.1:{prometheus_port}", at=0.0)
    try:

        def demo_done_and_scraped() -> bool:
            if "Serving metrics at" not in demo_log.read_text(errors="replace"):
                return False
            result = stack.get("/api/v1/query", query="sum(executions_total)")["data"]["result"]
            return bool(result) and float(result[0]["value"][1]) == 12

        wait_for("all 12 demo runs to be scraped", demo_done_and_scraped, 120, proc, log)
        time.sleep(2.5)  # a couple more scrapes of the final values
        stack.at = time.time()
        check_all(stack, panel_queries(), need_data=True)
    finally:
        for child in (demo, proc):
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
