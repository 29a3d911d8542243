"""Baseline: accounts, undelivered messages, send receipts.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# PostgreSQL: name keys sort by code point (collation "C") as on SQLite; bodies and client
# message ids may hold U+0000, which its text types cannot, so they are UTF-8 in bytea.
NameKey = sa.String(32).with_variant(sa.String(32, collation="C"), "postgresql")
Body = sa.Text().with_variant(sa.LargeBinary(), "postgresql")
ClientMsgId = sa.String(64).with_variant(sa.LargeBinary(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("name_key", NameKey, nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("name_key", name="uq_accounts_name_key"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("recipient_id", Id, nullable=False),
        sa.Column("sender_id", Id, nullable=True),
        sa.Column("sender_name", sa.String(32), nullable=False),
        sa.Column("sent_at", sa.BigInteger(), nullable=False),
        sa.Column("body", Body, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.ForeignKeyConstraint(["recipient_id"], ["accounts.id"], ondelete="CASCADE",
                                name="fk_messages_recipient_id_accounts"),
        sa.ForeignKeyConstraint(["sender_id"], ["accounts.id"], ondelete="SET NULL",
                                name="fk_messages_sender_id_accounts"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_messages_recipient_id_id", "messages", ["recipient_id", "id"])
    op.create_index("ix_messages_sender_id", "messages", ["sender_id"])
    op.create_table(
        "send_receipts",
        sa.Column("sender_id", Id, nullable=False),
        sa.Column("client_msg_id", ClientMsgId, nullable=False),
        sa.Column("message_id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sender_id", "client_msg_id", name="pk_send_receipts"),
        sa.ForeignKeyConstraint(["sender_id"], ["accounts.id"], ondelete="CASCADE",
                                name="fk_send_receipts_sender_id_accounts"),
    )
    op.create_index("ix_send_receipts_created_at", "send_receipts", ["created_at"])


def downgrade() -> None:
    op.drop_table("send_receipts")
    op.drop_table("messages")
    op.drop_table("accounts")
