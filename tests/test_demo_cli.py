"""`roma-otel demo`: the project's main job, run as a user runs it, with and without PostgreSQL persistence."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from roma_otel.cli import main
from roma_otel.report import build_tree, fetch_report, render_tree
from roma_otel.storage.localpg import find_bindir

ROOT = Path(__file__).resolve().parent.parent
URL_VARS = ("ROMA_OTEL_DATABASE_URL", "DATABASE_URL", "ROMA_OTEL_CONFIG")


def needs_server_binaries() -> None:
    if find_bindir() is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; scripts/setup.sh installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def no_database_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in URL_VARS:
        monkeypatch.delenv(name, raising=False)


def rows(dsn: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def is_down(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return True
    return False


def test_demo_prints_tree_tools_and_metrics(capsys) -> None:
    assert main(["demo", "--port", "0", "--no-postgres"]) == 0
    out = capsys.readouterr().out
    assert "  Postgres persistence: off (--no-postgres)\n" in out
    assert "Report, from the run's spans:" in out and "read back from Postgres" not in out
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
        float(c) for c in re.findall(r"^[│ ├└─]*(?:atomizer|planner|executor|aggregator)\s.*?\$(\d+\.\d+)", out, re.M)
    ]
    assert execution_cost > 0 and abs(execution_cost - sum(role_costs)) < 5e-6


def test_demo_persists_into_the_configured_database(pg_dsn: str, capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROMA_OTEL_SPOOL_DIR", str(tmp_path))  # the user's spool stays out of this database
    assert main(["demo", "--url", pg_dsn, "--port", "0"]) == 0
    out = capsys.readouterr().out
    assert "  Postgres: writing to " in out
    execution_id = re.search(r"^Execution id: (\w+)$", out, re.M).group(1)
    assert f"Report, read back from Postgres (`roma-otel report {execution_id}`):" in out
    assert rows(pg_dsn, "SELECT status, total_tasks FROM executions WHERE execution_id = %s", execution_id) == [
        ("completed", 3)
    ]
    (lm_calls,) = rows(pg_dsn, "SELECT count(*) FROM lm_traces WHERE execution_id = %s", execution_id)[0]
    (tool_calls,) = rows(pg_dsn, "SELECT count(*) FROM tool_invocation_traces WHERE execution_id = %s", execution_id)[0]
    assert lm_calls == 15 and tool_calls == 6  # per executor: search, a refused and a good calculation
    assert fetch_report(pg_dsn, execution_id) in out  # exactly what `roma-otel report` prints
    assert re.search(rf"^execution {execution_id[:8]} .* — 15 LM calls, ", out, re.M)


def test_demo_without_a_database_url_uses_a_throwaway_server(capsys, monkeypatch) -> None:
    needs_server_binaries()
    no_database_configured(monkeypatch)
    assert main(["demo", "--port", "0", "--max-depth", "1"]) == 0
    out = capsys.readouterr().out
    dsn = re.search(r"^  Postgres: throwaway server (\S+) \(stopped at exit\)$", out, re.M).group(1)
    execution_id = re.search(r"^Execution id: (\w+)$", out, re.M).group(1)
    assert f"Report, read back from Postgres (`roma-otel report {execution_id}`):\n\nExecution {execution_id}\n" in out
    assert re.search(r"^[│ ├└─]+executor\s+\d+ LM calls\s+\d+ tok", out, re.M)
    assert "Slowest tool calls (" in out
    assert is_down(dsn)  # stopped at exit


def test_demo_without_server_binaries_says_why_and_carries_on(capsys, monkeypatch) -> None:
    no_database_configured(monkeypatch)
    monkeypatch.setattr("roma_otel.storage.localpg.find_bindir", lambda: None)
    assert main(["demo", "--port", "0", "--max-depth", "1"]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "Postgres" in line and "skipped" in line]
    assert "no database URL configured" in line and "no PostgreSQL server binaries" in line
    assert "Report, from the run's spans:" in out and "Status: completed" in out


def test_demo_with_an_unreachable_database_is_a_clear_error(capsys) -> None:
    assert main(["demo", "--url", "postgresql://nobody:secret@127.0.0.1:1/nowhere", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roma-otel: error: cannot migrate PostgreSQL at postgresql://nobody:***@127.0.0.1:1/nowhere")
    assert "--no-postgres" in err and "secret" not in err


def test_demo_async_path(capsys) -> None:
    assert main(["demo", "--port", "0", "--async", "--max-depth", "1", "--no-postgres"]) == 0
    out = capsys.readouterr().out
    assert "Status: completed" in out and "executor" in out
    # Tasks finish concurrently here; each progress line is still a line of its own.
    done = re.findall(r"^  [✓✗] task done \[depth \d\] .*\(\d+ ms\)$", out, re.M)
    assert len(done) == out.count("task done") > 1


def test_progress_line_is_one_write() -> None:
    import io

    from opentelemetry.sdk.trace import TracerProvider

    from roma_otel import semconv as sc
    from roma_otel.demo.run import _Progress

    class Recording(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        def write(self, text: str) -> int:
            self.writes.append(text)
            return super().write(text)

    out = Recording()
    provider = TracerProvider()
    provider.add_span_processor(_Progress(out))
    with provider.get_tracer("t").start_as_current_span(sc.SPAN_TASK, attributes={sc.TASK_DEPTH: 1, sc.TASK_GOAL: "g"}):
        pass
    # One write holding the whole line: another thread's line cannot land between the text and its newline.
    assert len(out.writes) == 1 and re.fullmatch(r"  ✓ task done \[depth 1\] g \(\d+ ms\)\n", out.writes[0])


def test_demo_keeps_serving_for_scrapes(tmp_path: Path) -> None:
    """Metrics and the throwaway PostgreSQL stay up while serving; SIGTERM still stops the server."""
    needs_server_binaries()
    env = {k: v for k, v in os.environ.items() if k not in URL_VARS}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "roma_otel.cli", "demo", "--port", "0", "--keep-serving", "60"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = dsn = execution_id = None
        deadline = time.monotonic() + 90
        lines = []
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if match := re.search(r"Serving metrics at (http://\S+/metrics)", line):
                url = match.group(1)
            elif match := re.search(r"PostgreSQL \(throwaway\) stays up while serving, at (\S+)", line):
                dsn = match.group(1)
            elif match := re.search(r"^Execution id: (\w+)$", line):
                execution_id = match.group(1)
        assert url and dsn and execution_id, "".join(lines)
        assert rows(dsn, "SELECT execution_id, status FROM executions") == [(execution_id, "completed")]
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
    assert is_down(dsn)  # SIGTERM ran the cleanup


def test_busy_port_is_a_clear_error(capsys) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["demo", "--port", str(port), "--no-postgres"]) == 2
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
        s.attributes["gen_ai.usage.input_tokens"] + s.attributes["gen_ai.usage.output_tokens"] for s in lm_spans
    )
    assert "execution" in render_tree(roots)


def test_demo_repeat_accumulates_metrics_with_failures_and_toolkit_cache(capsys) -> None:
    from roma_otel.demo.agent import TOOLKITS

    TOOLKITS.clear()  # earlier tests in this process may have created the toolkits already
    assert main(["demo", "--port", "0", "--no-postgres", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "run 1/2: completed" in out and "run 2/2: completed" in out
    # two runs x two executors x two calculator calls, half of them refused (the currency in the expression)
    assert 'tool_invocations_total{tool_name="evaluate",toolkit_class="CalculatorToolkit"} 8.0' in out
    failed = (
        'tool_invocations_failed_total{error_type="ValueError",tool_name="evaluate",toolkit_class="CalculatorToolkit"}'
    )
    assert f"{failed} 4.0" in out
    # the toolkits are created once and served from the cache afterwards
    lifecycle = 'toolkit_lifecycle_events_total{{operation="{}",success="true",toolkit_class="CalculatorToolkit"}}'
    assert f"{lifecycle.format('create')} 1.0" in out
    assert re.search(re.escape(lifecycle.format("cache_hit")) + r" [1-9]", out)
    assert 'executions_total{status="completed"} 2.0' in out
