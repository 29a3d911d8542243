"""Accounts count their password resets (so a server can end sessions older than one).

A running server ends the sessions that logged in with a password an administrator has since
replaced (`chat admin reset-password`).

Existing accounts start at 0: no session of theirs can predate a reset that never happened.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


# Should batch mode rebuild the table, it must keep AUTOINCREMENT (ids are never reused).
_ACCOUNTS = {"table_kwargs": {"sqlite_autoincrement": True}}


def upgrade() -> None:
    with op.batch_alter_table("accounts", **_ACCOUNTS) as batch:
        batch.add_column(sa.Column("password_version", sa.Integer(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("accounts", **_ACCOUNTS) as batch:
        batch.drop_column("password_version")
