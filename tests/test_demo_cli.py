"""`roma-otel demo`: the project's main job, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from roma_otel.cli import main
from roma_otel.report import build_tree, render_tree

ROOT = Path(__file__).resolve().parent.parent


def test_demo_prints_tree_tools_and_metrics(capsys) -> None:
    assert main(["demo", "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert "Execution tree" in out
    # one line per role, with LM calls, tokens and cost
    for role in ("atomizer", "planner", "executor", "aggregator"):
        assert re.search(rf"{role}\s+\d+ LM calls?\s+\d+ tok\s+\$0\.\d{{6}}", out), role
    assert re.search(r"\[depth 1\] ", out)
    assert re.search(r"CalculatorToolkit\.evaluate\s+[1-9]", out)
    assert re.search(r"DocSearchToolkit\.search_docs\s+[1-9]", out)
    assert 'executions_total{status="completed"} 1.0' in out
    assert "Status: completed" in out
    # total cost on the execution line equals the sum of the per-role lines
    execution_cost = float(re.search(r"^execution .*?\$(\d+\.\d+)", out, re.M).group(1))
    role_costs = [
        float(c)
        for c in re.findall(r"^[│ ├└─]*(?:atomizer|planner|executor|aggregator)\s.*?\$(\d+\.\d+)", out, re.M)
    ]
    assert execution_cost > 0 and abs(execution_cost - sum(role_costs)) < 5e-6


def test_demo_async_path(capsys) -> None:
    assert main(["demo", "--port", "0", "--async", "--max-depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "Status: completed" in out and "executor" in out


def test_demo_keeps_serving_for_scrapes(tmp_path: Path) -> None:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "roma_otel.cli", "demo", "--port", "0", "--keep-serving", "60"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 90
        lines = []
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if match := re.search(r"Serving metrics at (http://\S+/metrics)", line):
                url = match.group(1)
        assert url, "".join(lines)
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert {
            "tool_invocations_total",
            "tool_duration_ms_bucket",
            "lm_calls_total",
            "executions_total",
        } <= samples
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_busy_port_is_a_clear_error(capsys) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    assert "observability.prometheus" in capsys.readouterr().err


def test_tree_sums_lm_spans(tel) -> None:

    from roma_otel.demo.agent import build_offline_lm, run_demo_agent

    run_demo_agent(lm=build_offline_lm(), max_depth=1)
    roots = build_tree(tel.spans())
    assert len(roots) == 1
    calls, tokens, _cost, unknown = roots[0].totals()
    lm_spans = [s for s in tel.spans() if s.name.startswith("chat ")]
    assert calls == len(lm_spans) and unknown == 0
    assert tokens == sum(
        s.attributes["gen_ai.usage.input_tokens"] + s.attributes["gen_ai.usage.output_tokens"]
        for s in lm_spans
    )
    assert "execution" in render_tree(roots)
