"""002_lm_traces: one row per language-model call, keyed by its OpenTelemetry span.

Revision ID: 002_lm_traces
Revises: 001_initial
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "002_lm_traces"
down_revision: str | Sequence[str] | None = "001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE_SQL = """
CREATE TABLE lm_traces (
    trace_id BIGSERIAL PRIMARY KEY,
    execution_id VARCHAR(64) NOT NULL,
    otel_trace_id VARCHAR(32) NOT NULL,
    span_id VARCHAR(16) NOT NULL,
    parent_span_id VARCHAR(16),
    task_id VARCHAR(64),
    depth INTEGER NOT NULL DEFAULT 0,
    module_name VARCHAR(128) NOT NULL,
    model VARCHAR(256) NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    cost_usd NUMERIC(14, 8),
    cost_source VARCHAR(16),
    latency_ms DOUBLE PRECISION NOT NULL,
    cache_hit BOOLEAN NOT NULL DEFAULT false,
    error TEXT,
    metadata JSONB NOT NULL DEFAULT '{}',
    CONSTRAINT uq_lm_traces_span UNIQUE (otel_trace_id, span_id),
    FOREIGN KEY (execution_id) REFERENCES executions(execution_id) ON DELETE CASCADE
);
CREATE INDEX idx_lm_traces_execution ON lm_traces (execution_id, created_at);
CREATE INDEX idx_lm_traces_module ON lm_traces (module_name);
"""

DOWNGRADE_SQL = """
DROP TABLE lm_traces;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
