"""004_toolkit_metrics: toolkit lifecycle events and individual tool invocations, from the toolkit spans.

Revision ID: 004_toolkit_metrics
Revises: 003_add_dag_snapshot
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "004_toolkit_metrics"
down_revision: str | Sequence[str] | None = "003_add_dag_snapshot"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The two blocks below are the spec's "数据库架构" section, character for character.
TOOLKIT_TRACES_SQL = """
CREATE TABLE toolkit_traces (
    trace_id BIGSERIAL PRIMARY KEY,
    execution_id VARCHAR(64) NOT NULL,
    timestamp TIMESTAMP WITH TIME ZONE NOT NULL,
    operation VARCHAR(32) NOT NULL,
    toolkit_class VARCHAR(128),
    duration_ms FLOAT NOT NULL,
    success BOOLEAN NOT NULL,
    error TEXT,
    metadata JSONB NOT NULL DEFAULT '{}',
    FOREIGN KEY (execution_id) REFERENCES executions(execution_id) ON DELETE CASCADE
);

-- Indexes for query performance
CREATE INDEX idx_toolkit_traces_execution ON toolkit_traces (execution_id, timestamp);
CREATE INDEX idx_toolkit_traces_operation ON toolkit_traces (operation);
CREATE INDEX idx_toolkit_traces_toolkit_class ON toolkit_traces (toolkit_class);
CREATE INDEX idx_toolkit_traces_success ON toolkit_traces (success);
"""

TOOL_INVOCATION_TRACES_SQL = """
CREATE TABLE tool_invocation_traces (
    trace_id BIGSERIAL PRIMARY KEY,
    execution_id VARCHAR(64) NOT NULL,
    toolkit_class VARCHAR(128) NOT NULL,
    tool_name VARCHAR(128) NOT NULL,
    invoked_at TIMESTAMP WITH TIME ZONE NOT NULL,
    duration_ms FLOAT NOT NULL,
    input_size_bytes INTEGER NOT NULL,
    output_size_bytes INTEGER NOT NULL,
    success BOOLEAN NOT NULL,
    error TEXT,
    metadata JSONB NOT NULL DEFAULT '{}',
    FOREIGN KEY (execution_id) REFERENCES executions(execution_id) ON DELETE CASCADE
);

-- Indexes for query performance
CREATE INDEX idx_tool_invocations_execution ON tool_invocation_traces (execution_id, invoked_at);
CREATE INDEX idx_tool_invocations_toolkit ON tool_invocation_traces (toolkit_class);
CREATE INDEX idx_tool_invocations_tool ON tool_invocation_traces (tool_name);
CREATE INDEX idx_tool_invocations_toolkit_tool ON tool_invocation_traces (toolkit_class, tool_name);
CREATE INDEX idx_tool_invocations_success ON tool_invocation_traces (success);
"""

# Rows written from spans carry the span's ids in metadata; a re-export of the same span is then a conflict
# that INSERT ... ON CONFLICT DO NOTHING ignores.
IDEMPOTENCY_SQL = """
CREATE UNIQUE INDEX uq_toolkit_traces_span ON toolkit_traces ((metadata->>'otel_trace_id'), (metadata->>'span_id'));
CREATE UNIQUE INDEX uq_tool_invocations_span ON tool_invocation_traces ((metadata->>'otel_trace_id'), (metadata->>'span_id'));
"""  # noqa: E501 - the index DDL is kept verbatim

DOWNGRADE_SQL = """
DROP TABLE tool_invocation_traces;
DROP TABLE toolkit_traces;
"""


def upgrade() -> None:
    op.execute(TOOLKIT_TRACES_SQL)
    op.execute(TOOL_INVOCATION_TRACES_SQL)
    op.execute(IDEMPOTENCY_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
