"""`roma-otel report`: an execution's header, task tree and slowest tools, read back from a real PostgreSQL.

The executions are produced by the demo agent (and a small explicit program) with the Postgres writer on.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

import roma_otel
from roma_otel import semconv as sc
from roma_otel.cli import main
from roma_otel.config import default_config
from roma_otel.demo.agent import build_offline_lm, run_demo_agent
from roma_otel.report import execution_tree, fetch_report, render_tree, report_from_spans
from roma_otel.storage.migrate import upgrade

ROLE_LINE = re.compile(r"^[│ ├└─]*(atomizer|planner|executor|aggregator)\s+(\d+) LM calls?\s+(\d+) tok\s+\$", re.M)
URL_VARS = ("ROMA_OTEL_DATABASE_URL", "DATABASE_URL", "ROMA_OTEL_CONFIG")


@roma_otel.toolkit
class Stations:
    def reading(self, city: str) -> str:
        return f"18 C in {city}"

    def offline(self, city: str) -> str:
        raise TimeoutError(f"{city} station is offline")


def rows(dsn: str, sql: str, *params: Any) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def migrated(pg_dsn: str) -> str:
    upgrade(pg_dsn)
    return pg_dsn


@pytest.fixture
def persisting(make_tel, migrated: str, tmp_path) -> Any:
    """Instrumented with the Postgres writer on (spooling, if ever, to tmp_path)."""
    config = default_config()
    config.storage.postgres.enabled = True
    config.storage.postgres.connection_url = migrated
    tel = make_tel(config)
    tel.instrumentor._postgres.spool_dir = tmp_path
    return tel


def flushed_execution_id(tel: Any) -> str:
    assert tel.instrumentor._postgres.force_flush(20_000)
    (root,) = [s for s in tel.spans() if s.name == sc.SPAN_EXECUTION]
    return str(root.attributes[sc.EXECUTION_ID])


def test_report_of_a_demo_run_matches_the_rows(persisting, migrated: str, capsys, monkeypatch) -> None:
    run_demo_agent(lm=build_offline_lm(), max_depth=2)
    execution_id = flushed_execution_id(persisting)

    assert main(["report", execution_id, "--url", migrated, "--slowest", "3"]) == 0
    out = capsys.readouterr().out

    # per role: LM calls and tokens summed over the tree's lines equal the lm_traces rows
    shown: dict[str, list[int]] = {}
    for role, calls, tokens in ROLE_LINE.findall(out):
        total = shown.setdefault(role, [0, 0])
        total[0] += int(calls)
        total[1] += int(tokens)
    stored = rows(
        migrated,
        "SELECT module_name, count(*), sum(total_tokens) FROM lm_traces WHERE execution_id = %s GROUP BY 1",
        execution_id,
    )
    assert shown == {module: [calls, tokens] for module, calls, tokens in stored}
    assert set(shown) == {"atomizer", "planner", "executor", "aggregator"}
    assert "   └─ [depth 0] " in out and "      ├─ [depth 1] " in out

    # the header's totals are the executions row's
    ((task, status, seconds, tasks, completed, failed, reached, limit, tokens, cost),) = rows(
        migrated,
        "SELECT task, status, execution_duration, total_tasks, completed_tasks, failed_tasks, max_depth_reached, "
        "max_depth, total_tokens, total_cost FROM executions WHERE execution_id = %s",
        execution_id,
    )
    assert f"Execution {execution_id}\n  goal:     {task}\n  status:   {status}\n" in out
    assert f"  duration: {seconds * 1000:.1f} ms\n" in out
    assert (
        f"  totals:   {tasks} tasks ({completed} completed, {failed} failed), max depth reached {reached} of {limit}, "
        f"{tokens} tok, ${cost:.6f}\n"
    ) in out
    # ... and so are the tree's roll-ups
    lm_calls = sum(c for _, c, _ in stored)
    assert re.search(
        rf"^execution {execution_id[:8]} .* — {lm_calls} LM calls, {tokens} tok, \${cost:.6f}, ", out, re.M
    )

    # the three slowest tool calls, longest first
    (total_tools,) = rows(
        migrated, "SELECT count(*) FROM tool_invocation_traces WHERE execution_id = %s", execution_id
    )[0]
    section = out.split(f"Slowest tool calls (3 of {total_tools}):\n", 1)[1].splitlines()[2:5]
    listed = [(line.split()[0], float(line.split()[1]), line.split()[2]) for line in section]
    durations = [d for _, d, _ in listed]
    assert durations == sorted(durations, reverse=True)
    slowest = rows(
        migrated,
        "SELECT toolkit_class || '.' || tool_name, duration_ms, success FROM tool_invocation_traces "
        "WHERE execution_id = %s ORDER BY duration_ms DESC LIMIT 3",
        execution_id,
    )
    assert [(n, round(d, 2), "yes" if ok else "no") for n, d, ok in slowest] == listed

    # the demo's span path renders the very same report
    assert fetch_report(migrated, execution_id, slowest=3) == report_from_spans(persisting.spans(), slowest=3)
    assert out.rstrip("\n") == fetch_report(migrated, execution_id, slowest=3)

    # without --url the DSN comes from the environment
    for name in URL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROMA_OTEL_DATABASE_URL", migrated)
    assert main(["report", execution_id, "--slowest", "3"]) == 0
    assert capsys.readouterr().out == out


def test_failed_tool_calls_show_their_error_type(persisting, migrated: str, capsys) -> None:
    with roma_otel.execution("check the stations", max_depth=1), roma_otel.task("read", depth=1):
        Stations().reading("Rome")
        with pytest.raises(TimeoutError):
            Stations().offline("Oslo")
    execution_id = flushed_execution_id(persisting)
    assert main(["report", execution_id, "--url", migrated]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Stations\.offline\s+\d+\.\d\d  no\s+TimeoutError$", out, re.M)
    assert re.search(r"^Stations\.reading\s+\d+\.\d\d  yes$", out, re.M)
    assert "  goal:     check the stations\n" in out


def test_unknown_execution_is_exit_1(migrated: str, capsys) -> None:
    assert main(["report", "no-such-execution", "--url", migrated]) == 1
    captured = capsys.readouterr()
    assert "execution no-such-execution not found" in captured.err and captured.out == ""


def test_unreachable_database_is_exit_2(capsys) -> None:
    assert main(["report", "x", "--url", "postgresql://nobody:secret@127.0.0.1:1/nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roma-otel: error: cannot read PostgreSQL at postgresql://nobody:***@127.0.0.1:1/nowhere")
    assert "secret" not in err


def test_database_without_the_schema_is_exit_2(pg_dsn: str, capsys) -> None:
    assert main(["report", "x", "--url", pg_dsn]) == 2
    assert "roma-otel db upgrade" in capsys.readouterr().err


def test_no_database_url_is_exit_2(monkeypatch, capsys) -> None:
    for name in URL_VARS:
        monkeypatch.delenv(name, raising=False)
    assert main(["report", "x"]) == 2
    assert "ROMA_OTEL_DATABASE_URL" in capsys.readouterr().err


def test_lm_rows_go_to_the_nearest_shown_node_and_orphans_to_the_root() -> None:
    def node(span_id: str, parent: str | None, kind: str, start: str, **extra: Any) -> dict[str, Any]:
        return {"span_id": span_id, "parent_span_id": parent, "kind": kind, "duration_ms": 10.0, "status": "ok",
                "start": f"2025-01-01T00:00:0{start}+00:00", "depth": 1, **extra}  # fmt: skip

    nodes = [
        node("e", None, "execution", "0"),
        node("t", "e", "task", "1", goal="find sights", task_id="t1"),
        node("x", "t", "module", "2", module="executor", module_class="demo.Executor", task_id="t1"),
        node("r", "x", "module", "3", module="ReAct", module_class="dspy.predict.react.ReAct", task_id="t1"),
    ]
    lm = [
        {"span_id": "1", "parent_span_id": "r", "total_tokens": 30, "cost_usd": 0.5, "latency_ms": 1.0},
        {"span_id": "2", "parent_span_id": "t", "prompt_tokens": 4, "completion_tokens": 6, "cost_usd": None},
        {"span_id": "3", "parent_span_id": "gone", "total_tokens": 7, "cost_usd": 0.25},
    ]
    tools = [{"tool_name": "search", "metadata": {"module": "executor", "task_id": "t1"},
              "invoked_at": "2025-01-01T00:00:02.005+00:00"}]  # fmt: skip
    root = execution_tree({"execution_id": "abcdef123", "task": "trip", "status": "completed"}, nodes, lm, tools)
    (task,) = root.children
    (executor,) = task.children  # ReAct folds into the executor
    assert (root.lm_calls, root.tokens, root.cost) == (1, 7, 0.25)
    assert (task.lm_calls, task.tokens, task.cost_unknown) == (1, 10, 1)
    assert (executor.lm_calls, executor.tokens, executor.cost, executor.tools) == (1, 30, 0.5, {"search": 1})
    assert root.totals() == (3, 47, 0.75, 1)
    assert render_tree([root]).splitlines()[0].startswith("execution abcdef12  trip  — 3 LM calls, 47 tok")
