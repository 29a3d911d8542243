"""Accounts remember their last login (for `chat admin list-accounts`).

Data migration: registering logs the new account in, so every existing account has logged in
at least at its creation; ``last_login_at`` starts as ``created_at`` rather than unknown.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


# Should batch mode rebuild the table, it must keep AUTOINCREMENT (ids are never reused).
_ACCOUNTS = {"table_kwargs": {"sqlite_autoincrement": True}}


def upgrade() -> None:
    with op.batch_alter_table("accounts", **_ACCOUNTS) as batch:
        batch.add_column(sa.Column("last_login_at", sa.BigInteger(), nullable=True))
    op.execute("UPDATE accounts SET last_login_at = created_at WHERE last_login_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("accounts", **_ACCOUNTS) as batch:
        batch.drop_column("last_login_at")
