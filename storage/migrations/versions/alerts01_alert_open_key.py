"""alerts: one open alert per group (alert.open_key), delivery deadline (delivery.expires_at)

Revision ID: alerts01
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "alerts01"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("alert", schema=None) as batch_op:
        batch_op.add_column(sa.Column("open_key", sa.String(length=700), nullable=True))
        batch_op.create_index("ux_alert_open_key", ["open_key"], unique=True)
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_column("expires_at")
    with op.batch_alter_table("alert", schema=None) as batch_op:
        batch_op.drop_index("ux_alert_open_key")
        batch_op.drop_column("open_key")
