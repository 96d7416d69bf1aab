"""feeds: fixed-interval flag, observed publishing interval and <ttl> on feed

Revision ID: feeds01
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "feeds01"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("feed", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("interval_fixed", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("publish_interval", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ttl_seconds", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("feed", schema=None) as batch_op:
        batch_op.drop_column("ttl_seconds")
        batch_op.drop_column("publish_interval")
        batch_op.drop_column("interval_fixed")
