"""001_initial: the executions table, one row per ROMA/DSPy run.

Revision ID: 001_initial
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE_SQL = """
CREATE TABLE executions (
    execution_id VARCHAR(64) PRIMARY KEY,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT now(),
    status VARCHAR(32) NOT NULL DEFAULT 'running',
    task TEXT,
    max_depth INTEGER,
    solver_type VARCHAR(128),
    config_version VARCHAR(64),
    config JSONB NOT NULL DEFAULT '{}',
    total_tasks INTEGER NOT NULL DEFAULT 0,
    completed_tasks INTEGER NOT NULL DEFAULT 0,
    failed_tasks INTEGER NOT NULL DEFAULT 0,
    total_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
    total_tokens BIGINT NOT NULL DEFAULT 0,
    execution_duration DOUBLE PRECISION,
    max_depth_reached INTEGER NOT NULL DEFAULT 0,
    otel_trace_id VARCHAR(32),
    metadata JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX idx_executions_created_at ON executions (created_at);
CREATE INDEX idx_executions_status ON executions (status);
"""

DOWNGRADE_SQL = """
DROP TABLE executions;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
