"""merge the feeds, classifier and alerts branches

Revision ID: 0002
Revises: alerts01, classify01, feeds01
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0002"
down_revision: str | Sequence[str] | None = ("alerts01", "classify01", "feeds01")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
