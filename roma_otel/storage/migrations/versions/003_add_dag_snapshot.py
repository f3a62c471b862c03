"""003_add_dag_snapshot: the execution's final task DAG as JSON.

Revision ID: 003_add_dag_snapshot
Revises: 002_lm_traces
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "003_add_dag_snapshot"
down_revision: str | Sequence[str] | None = "002_lm_traces"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE_SQL = """
ALTER TABLE executions ADD COLUMN dag_snapshot JSONB;
"""

DOWNGRADE_SQL = """
ALTER TABLE executions DROP COLUMN dag_snapshot;
"""


def upgrade() -> None:
    op.execute(UPGRADE_SQL)


def downgrade() -> None:
    op.execute(DOWNGRADE_SQL)
