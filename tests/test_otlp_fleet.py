"""The fleet layout end to end, in real processes: agent processes that export OTLP only, two
``roma-otel serve`` replicas writing one PostgreSQL, and ``roma-otel report`` reading it back.

The agent is ``roma-otel demo`` (the offline ROMA-style agent). In the parity test each demo also writes
with the in-process writer into a second database, so the receivers' rows can be compared column for
column with the rows that writer makes from the very same spans.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from roma_otel.storage.migrate import upgrade
from tests.test_api import free_port
from tests.test_otlp_receiver import second_database, table_rows

TOKEN = "fleet-token"


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ROMA_OTEL_", "DATABASE_URL"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", ROMA_OTEL_SPOOL_DIR=str(tmp_path / "spool"), HOME=str(tmp_path))
    return env


@pytest.fixture
def replicas(pg_dsn: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two ``roma-otel serve`` replicas on the same database, with a token; their base URLs. The second
    runs two worker processes (``--workers 2``), so requests to it land in either."""
    upgrade(pg_dsn)
    procs, urls = [], []
    env = base_env(tmp_path)
    try:
        for i in range(2):
            port = free_port()
            log = (tmp_path / f"serve-{i}.log").open("w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "roma_otel.cli", "serve", "--url", pg_dsn, "--port", str(port),
                 "--token", TOKEN, "--log-level", "warning", "--workers", str(i + 1)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        for proc, url in zip(procs, urls, strict=True):
            while True:
                assert proc.poll() is None, (tmp_path / f"serve-{procs.index(proc)}.log").read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "roma-otel serve did not come up in 60 s"
                time.sleep(0.2)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_demos(tmp_path: Path, endpoints: list[str], extra: list[str]) -> None:
    """One ``roma-otel demo`` process per endpoint, all at once; each exports its spans there over OTLP/HTTP."""
    procs = []
    for i, endpoint in enumerate(endpoints):
        env = base_env(tmp_path / f"app-{i}")
        (tmp_path / f"app-{i}").mkdir()
        env.update(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{endpoint}/v1/traces",
            OTEL_EXPORTER_OTLP_HEADERS=f"Authorization=Bearer%20{TOKEN}",  # percent-encoded, as the SDK reads it
            OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="30",
        )
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "roma_otel.cli", "demo", "--port", "0", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert "Status: completed" in out, out


def test_four_agents_into_two_replicas_store_the_in_process_writers_rows(
    pg_dsn: str, replicas: list[str], tmp_path: Path
) -> None:
    reference = second_database(pg_dsn, pg_dsn.rsplit("dbname=", 1)[1].split()[0] + "_inproc")
    run_demos(tmp_path, [replicas[i % 2] for i in range(4)], ["--url", reference])
    expected = table_rows(reference)
    assert len(expected["executions"]) == 4 and all(expected.values()), {k: len(v) for k, v in expected.items()}
    # The SDK exports from a background thread: the demo flushed it before exiting, and each 200 was a commit.
    assert table_rows(pg_dsn) == expected


def test_agents_without_database_settings_are_reported_complete(
    pg_dsn: str, replicas: list[str], tmp_path: Path
) -> None:
    """The README's fleet recipe: two app processes with no database settings, OTLP to the receiver, then
    ``roma-otel report EXECUTION_ID`` for each."""
    run_demos(tmp_path, replicas, ["--no-postgres"])
    with psycopg.connect(pg_dsn) as conn:
        ids = [r[0] for r in conn.execute("SELECT execution_id FROM executions ORDER BY created_at")]
    assert len(ids) == 2
    for execution_id in ids:
        report = subprocess.run(
            [sys.executable, "-m", "roma_otel.cli", "report", execution_id, "--url", pg_dsn],
            env=base_env(tmp_path), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr
        assert execution_id in report.stdout and "completed" in report.stdout, report.stdout
