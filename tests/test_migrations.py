"""Tests for the Alembic migrations against a real PostgreSQL: the spec's `alembic` commands, the exact schema,
``roma-otel db ...``, roma_otel.storage.migrate and how the database URL is found.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from roma_otel.cli import main
from roma_otel.config import ConfigError
from roma_otel.storage import migrate

ROOT = Path(__file__).resolve().parents[1]
ALEMBIC = Path(sys.executable).parent / "alembic"
URL_VARS = ("ROMA_OTEL_DATABASE_URL", "DATABASE_URL", "ROMA_OTEL_CONFIG")
REVISIONS = ["001_initial", "002_lm_traces", "003_add_dag_snapshot", "004_toolkit_metrics"]
TOOLKIT_TABLES = {"toolkit_traces", "tool_invocation_traces"}
ALL_TABLES = {"executions", "lm_traces", *TOOLKIT_TABLES}

# (name, type, nullable, default) as information_schema.columns reports them; "nextval" stands for a serial.
EXECUTIONS = [
    ("execution_id", "character varying(64)", False, None),
    ("created_at", "timestamp with time zone", False, "now()"),
    ("updated_at", "timestamp with time zone", False, "now()"),
    ("status", "character varying(32)", False, "'running'::character varying"),
    ("task", "text", True, None),
    ("max_depth", "integer", True, None),
    ("solver_type", "character varying(128)", True, None),
    ("config_version", "character varying(64)", True, None),
    ("config", "jsonb", False, "'{}'::jsonb"),
    ("total_tasks", "integer", False, "0"),
    ("completed_tasks", "integer", False, "0"),
    ("failed_tasks", "integer", False, "0"),
    ("total_cost", "double precision", False, "0"),
    ("total_tokens", "bigint", False, "0"),
    ("execution_duration", "double precision", True, None),
    ("max_depth_reached", "integer", False, "0"),
    ("otel_trace_id", "character varying(32)", True, None),
    ("metadata", "jsonb", False, "'{}'::jsonb"),
    ("dag_snapshot", "jsonb", True, None),
]
LM_TRACES = [
    ("trace_id", "bigint", False, "nextval"),
    ("execution_id", "character varying(64)", False, None),
    ("otel_trace_id", "character varying(32)", False, None),
    ("span_id", "character varying(16)", False, None),
    ("parent_span_id", "character varying(16)", True, None),
    ("task_id", "character varying(64)", True, None),
    ("depth", "integer", False, "0"),
    ("module_name", "character varying(128)", False, None),
    ("model", "character varying(256)", False, None),
    ("created_at", "timestamp with time zone", False, None),
    ("prompt_tokens", "integer", True, None),
    ("completion_tokens", "integer", True, None),
    ("total_tokens", "integer", True, None),
    ("cost_usd", "numeric(14,8)", True, None),
    ("cost_source", "character varying(16)", True, None),
    ("latency_ms", "double precision", False, None),
    ("cache_hit", "boolean", False, "false"),
    ("error", "text", True, None),
    ("metadata", "jsonb", False, "'{}'::jsonb"),
]
# The spec's toolkit_traces / tool_invocation_traces (FLOAT is double precision in PostgreSQL).
TOOLKIT_TRACES = [
    ("trace_id", "bigint", False, "nextval"),
    ("execution_id", "character varying(64)", False, None),
    ("timestamp", "timestamp with time zone", False, None),
    ("operation", "character varying(32)", False, None),
    ("toolkit_class", "character varying(128)", True, None),
    ("duration_ms", "double precision", False, None),
    ("success", "boolean", False, None),
    ("error", "text", True, None),
    ("metadata", "jsonb", False, "'{}'::jsonb"),
]
TOOL_INVOCATION_TRACES = [
    ("trace_id", "bigint", False, "nextval"),
    ("execution_id", "character varying(64)", False, None),
    ("toolkit_class", "character varying(128)", False, None),
    ("tool_name", "character varying(128)", False, None),
    ("invoked_at", "timestamp with time zone", False, None),
    ("duration_ms", "double precision", False, None),
    ("input_size_bytes", "integer", False, None),
    ("output_size_bytes", "integer", False, None),
    ("success", "boolean", False, None),
    ("error", "text", True, None),
    ("metadata", "jsonb", False, "'{}'::jsonb"),
]
INDEXES = {
    "executions": {"executions_pkey", "idx_executions_created_at", "idx_executions_status"},
    "lm_traces": {"lm_traces_pkey", "uq_lm_traces_span", "idx_lm_traces_execution", "idx_lm_traces_module"},
    "toolkit_traces": {
        "toolkit_traces_pkey",
        "idx_toolkit_traces_execution",
        "idx_toolkit_traces_operation",
        "idx_toolkit_traces_toolkit_class",
        "idx_toolkit_traces_success",
        "uq_toolkit_traces_span",
    },
    "tool_invocation_traces": {
        "tool_invocation_traces_pkey",
        "idx_tool_invocations_execution",
        "idx_tool_invocations_toolkit",
        "idx_tool_invocations_tool",
        "idx_tool_invocations_toolkit_tool",
        "idx_tool_invocations_success",
        "uq_tool_invocations_span",
    },
}


# --- helpers ------------------------------------------------------------------------------------------
def as_url(dsn: str) -> str:
    """The test's libpq key=value DSN as a postgresql:// URL."""
    p = conninfo_to_dict(dsn)
    auth = p["user"] + (f":{p['password']}" if p.get("password") else "")
    return f"postgresql://{auth}@{p['host']}:{p['port']}/{p['dbname']}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in URL_VARS}
    env.update(extra)
    return env


def alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the alembic command line from the repository root, as the spec does."""
    return subprocess.run(
        [str(ALEMBIC), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params or None).fetchall()


def tables(dsn: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def columns(dsn: str, table: str) -> list[tuple[str, str, bool, str | None]]:
    rows = query(
        dsn,
        """SELECT column_name, data_type, character_maximum_length, numeric_precision, numeric_scale,
                  is_nullable, column_default
           FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s
           ORDER BY ordinal_position""",
        table,
    )
    out = []
    for name, data_type, char_len, precision, scale, nullable, default in rows:
        kind = data_type
        if data_type == "character varying":
            kind = f"{data_type}({char_len})"
        elif data_type == "numeric":
            kind = f"numeric({precision},{scale})"
        if default is not None and default.startswith("nextval("):
            default = "nextval"
        out.append((name, kind, nullable == "YES", default))
    return out


def indexes(dsn: str, table: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = %s", table)}


def foreign_keys(dsn: str, table: str) -> list[tuple[str, str, str]]:
    """(referenced table, its columns, ON DELETE action code) of each foreign key on ``table``."""
    return query(
        dsn,
        """SELECT confrelid::regclass::text, pg_get_constraintdef(oid), confdeltype::text FROM pg_constraint
           WHERE contype = 'f' AND conrelid = %s::regclass""",
        table,
    )


# --- the spec's alembic commands, run from the repository root --------------------------------------------
def test_spec_alembic_commands_from_the_repository_root(pg_dsn: str) -> None:
    env = clean_env(ROMA_OTEL_DATABASE_URL=pg_dsn)
    ok(alembic("upgrade", "head", env=env))
    assert tables(pg_dsn) == ALL_TABLES | {"alembic_version"}
    assert "004_toolkit_metrics (head)" in ok(alembic("current", env=env))

    ok(alembic("downgrade", "003_add_dag_snapshot", env=env))
    assert tables(pg_dsn) == ALL_TABLES - TOOLKIT_TABLES | {"alembic_version"}
    current = ok(alembic("current", env=env))
    assert "003_add_dag_snapshot" in current and "(head)" not in current

    ok(alembic("upgrade", "004_toolkit_metrics", env=env))
    assert tables(pg_dsn) == ALL_TABLES | {"alembic_version"}
    assert "004_toolkit_metrics (head)" in ok(alembic("current", env=env))


def test_alembic_x_url_wins_over_the_environment(pg_dsn: str) -> None:
    env = clean_env(ROMA_OTEL_DATABASE_URL="postgresql://nobody@127.0.0.1:1/nowhere")
    ok(alembic("-x", f"url={as_url(pg_dsn)}", "upgrade", "head", env=env))
    assert "004_toolkit_metrics (head)" in ok(alembic("-x", f"url={as_url(pg_dsn)}", "current", env=env))
    assert migrate.current(pg_dsn) == "004_toolkit_metrics"


def test_database_url_env_is_the_fallback(pg_dsn: str) -> None:
    ok(alembic("upgrade", "002_lm_traces", env=clean_env(DATABASE_URL=as_url(pg_dsn))))
    assert tables(pg_dsn) == {"executions", "lm_traces", "alembic_version"}


def test_revision_chain_is_linear_with_the_spec_ids() -> None:
    lines = ok(alembic("history", env=clean_env())).splitlines()
    chain = [line.split(",")[0] for line in reversed(lines)]
    assert chain == [
        "<base> -> 001_initial",
        "001_initial -> 002_lm_traces",
        "002_lm_traces -> 003_add_dag_snapshot",
        "003_add_dag_snapshot -> 004_toolkit_metrics (head)",
    ]
    assert migrate.head() == REVISIONS[-1]


def test_offline_sql_needs_no_database() -> None:
    sql = ok(alembic("upgrade", "head", "--sql", env=clean_env()))
    assert "CREATE TABLE toolkit_traces (" in sql
    assert "CREATE UNIQUE INDEX uq_tool_invocations_span" in sql


# --- the schema -------------------------------------------------------------------------------------------
def test_schema_matches_the_spec_exactly(pg_dsn: str) -> None:
    migrate.upgrade(pg_dsn)
    assert columns(pg_dsn, "toolkit_traces") == TOOLKIT_TRACES
    assert columns(pg_dsn, "tool_invocation_traces") == TOOL_INVOCATION_TRACES
    assert columns(pg_dsn, "lm_traces") == LM_TRACES
    assert columns(pg_dsn, "executions") == EXECUTIONS
    for table, expected in INDEXES.items():
        assert indexes(pg_dsn, table) == expected, table
    for table in ("lm_traces", "toolkit_traces", "tool_invocation_traces"):
        assert foreign_keys(pg_dsn, table) == [
            ("executions", "FOREIGN KEY (execution_id) REFERENCES executions(execution_id) ON DELETE CASCADE", "c")
        ]
    assert foreign_keys(pg_dsn, "executions") == []


def test_span_ids_make_rows_idempotent_and_executions_cascade(pg_dsn: str) -> None:
    migrate.upgrade(pg_dsn)
    ids = '{"otel_trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"}'
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO executions (execution_id) VALUES ('exec_1')")
        for _ in range(2):
            conn.execute(
                """INSERT INTO toolkit_traces (execution_id, timestamp, operation, duration_ms, success, metadata)
                   VALUES ('exec_1', now(), 'create', 1.5, true, %s::jsonb) ON CONFLICT DO NOTHING""",
                (ids,),
            )
            conn.execute(
                """INSERT INTO tool_invocation_traces (execution_id, toolkit_class, tool_name, invoked_at,
                       duration_ms, input_size_bytes, output_size_bytes, success, metadata)
                   VALUES ('exec_1', 'SerperToolkit', 'search_web', now(), 2.0, 10, 20, true, %s::jsonb)
                   ON CONFLICT DO NOTHING""",
                (ids,),
            )
    assert query(pg_dsn, "SELECT count(*) FROM toolkit_traces") == [(1,)]
    assert query(pg_dsn, "SELECT count(*) FROM tool_invocation_traces") == [(1,)]
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("DELETE FROM executions WHERE execution_id = 'exec_1'")
    assert query(pg_dsn, "SELECT count(*) FROM toolkit_traces") == [(0,)]
    assert query(pg_dsn, "SELECT count(*) FROM tool_invocation_traces") == [(0,)]


def test_each_downgrade_undoes_its_upgrade(pg_dsn: str) -> None:
    migrate.upgrade(pg_dsn)
    migrate.downgrade(pg_dsn, "003_add_dag_snapshot")
    assert tables(pg_dsn) == {"executions", "lm_traces", "alembic_version"}
    assert "dag_snapshot" in [c[0] for c in columns(pg_dsn, "executions")]
    migrate.downgrade(pg_dsn, "002_lm_traces")
    assert columns(pg_dsn, "executions") == EXECUTIONS[:-1]
    migrate.downgrade(pg_dsn, "001_initial")
    assert tables(pg_dsn) == {"executions", "alembic_version"}
    migrate.downgrade(pg_dsn, "base")
    assert tables(pg_dsn) == {"alembic_version"}
    assert migrate.current(pg_dsn) is None


# --- roma-otel db ... and roma_otel.storage.migrate ----------------------------------------------------
def test_cli_db_round_trip(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = as_url(pg_dsn)
    assert main(["db", "current", "--url", url]) == 0
    assert "base" in capsys.readouterr().out

    assert main(["db", "upgrade", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "004_toolkit_metrics (head)"
    assert main(["db", "current", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "004_toolkit_metrics (head)"

    assert main(["db", "downgrade", "003_add_dag_snapshot", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "003_add_dag_snapshot"
    assert tables(pg_dsn) == ALL_TABLES - TOOLKIT_TABLES | {"alembic_version"}
    assert migrate.current(url) == "003_add_dag_snapshot"

    assert main(["db", "downgrade", "base", "--url", url]) == 0
    assert tables(pg_dsn) == {"alembic_version"}
    assert migrate.current(url) is None

    assert main(["db", "upgrade", "004_toolkit_metrics", "--url", url]) == 0
    assert capsys.readouterr().out.strip().endswith("004_toolkit_metrics (head)")
    assert tables(pg_dsn) == ALL_TABLES | {"alembic_version"}
    assert columns(pg_dsn, "toolkit_traces") == TOOLKIT_TRACES


def test_cli_db_reads_the_environment(pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in URL_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROMA_OTEL_DATABASE_URL", pg_dsn)
    assert main(["db", "upgrade", "002_lm_traces"]) == 0
    assert capsys.readouterr().out.strip() == "002_lm_traces"
    migrate.upgrade()
    assert migrate.current() == "004_toolkit_metrics"


def test_cli_db_reports_bad_revisions_and_unreachable_servers(pg_dsn: str, capsys) -> None:
    assert main(["db", "upgrade", "999_nope", "--url", pg_dsn]) == 1
    assert "999_nope" in capsys.readouterr().err
    assert main(["db", "current", "--url", "postgresql://nobody@127.0.0.1:1/nowhere"]) == 1
    assert capsys.readouterr().err.startswith("roma-otel: error:")


def test_config_file_connection_url_is_the_last_resort(pg_dsn: str, tmp_path: Path, monkeypatch) -> None:
    for name in URL_VARS:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "roma-otel.yaml"
    config.write_text(f"storage:\n  postgres:\n    connection_url: {as_url(pg_dsn)!r}\n", encoding="utf-8")
    monkeypatch.setenv("ROMA_OTEL_CONFIG", str(config))
    assert migrate.resolve_database_url() == as_url(pg_dsn)
    migrate.upgrade()
    assert migrate.current() == "004_toolkit_metrics"
    ok(alembic("upgrade", "head", env=clean_env(ROMA_OTEL_CONFIG=str(config))))


# --- URL resolution and conversion ----------------------------------------------------------------------
def test_url_precedence() -> None:
    env = {"ROMA_OTEL_DATABASE_URL": "postgresql://a/roma", "DATABASE_URL": "postgresql://b/generic"}
    assert migrate.resolve_database_url("postgresql://x/explicit", env=env) == "postgresql://x/explicit"
    assert migrate.resolve_database_url(None, env=env) == "postgresql://a/roma"
    assert migrate.resolve_database_url(None, env={"DATABASE_URL": "postgresql://b/generic"}) == (
        "postgresql://b/generic"
    )


def test_missing_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for name in URL_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as info:
        migrate.upgrade()
    for option in ("ROMA_OTEL_DATABASE_URL", "DATABASE_URL", "storage.postgres.connection_url", "--url"):
        assert option in str(info.value)
    with pytest.raises(ConfigError):
        migrate.current()

    assert main(["db", "current"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roma-otel: error: no PostgreSQL database URL")
    assert "ROMA_OTEL_DATABASE_URL" in err and "storage.postgres.connection_url" in err

    result = alembic("upgrade", "head", env=clean_env())
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "FAILED: no PostgreSQL database URL" in output
    assert "ROMA_OTEL_DATABASE_URL" in output and "-x url=" in output
    assert "Traceback" not in output


def test_urls_are_converted_to_the_psycopg_driver() -> None:
    def render(url: str) -> str:
        return migrate.sqlalchemy_url(url).render_as_string(hide_password=False)

    assert render("postgresql://u:p%40ss@db:5433/roma?sslmode=require") == (
        "postgresql+psycopg://u:p%40ss@db:5433/roma?sslmode=require"
    )
    assert render("postgres://u@db/roma") == "postgresql+psycopg://u@db/roma"
    assert render("postgresql+psycopg://u@db/roma") == "postgresql+psycopg://u@db/roma"
    assert render("host=127.0.0.1 port=5432 dbname=roma user=u password=s3cret") == (
        "postgresql+psycopg://u:s3cret@127.0.0.1:5432/roma"
    )
    socket_url = migrate.sqlalchemy_url("host=/var/run/postgresql dbname=roma")
    assert socket_url.database == "roma" and socket_url.query["host"] == "/var/run/postgresql"
    with pytest.raises(ConfigError, match="PostgreSQL"):
        migrate.sqlalchemy_url("mysql://u@db/roma")
    with pytest.raises(ConfigError, match="libpq"):
        migrate.sqlalchemy_url("not a dsn at all")
