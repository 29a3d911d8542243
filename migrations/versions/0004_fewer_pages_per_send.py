"""A send writes three fewer B-tree pages.

Changes: no index or foreign key on messages.sender_id, no created_at index on
send_receipts, and (SQLite) send_receipts WITHOUT ROWID.

Storing a message wrote seven B-tree pages per commit (the message, its two indexes, the
AUTOINCREMENT counter, the receipt row, the receipt key and its created_at index); each page
is one more WAL frame to write and sync. This revision drops three of them:

- ``messages.sender_id`` becomes a record of who sent a message, not a reference: the foreign
  key (ON DELETE SET NULL) and the index it needed are dropped. Deleting an account no longer
  rewrites the messages it sent; they keep its id, which no later account can take (ids are
  never reused). Nothing reads the column to deliver a message (``sender_name`` is copied).
- ``send_receipts`` on SQLite is rebuilt as a WITHOUT ROWID table (the rows live in the
  primary key's B-tree), and its ``created_at`` index is dropped: ``chat admin purge`` walks
  the primary key instead.

Data: every message, its id and the AUTOINCREMENT counter are kept (a rebuilt SQLite table
gets the old counter back, so ids are still never reused); every receipt is kept.
Downgrade restores the old shape; it clears ``sender_id`` of messages whose sender no longer
exists, as the old foreign key would have.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _message_counter() -> int | None:
    return op.get_bind().execute(
        sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")).scalar()


def _restore_message_counter(seq: int | None) -> None:
    """A rebuilt AUTOINCREMENT table restarts its counter at its largest id; ids above that
    were used by messages since acknowledged, so the old counter is put back."""
    if seq is None:
        return
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM sqlite_sequence WHERE name = 'messages'")).first():
        bind.execute(sa.text("UPDATE sqlite_sequence SET seq = MAX(seq, :seq) "
                             "WHERE name = 'messages'"), {"seq": seq})
    else:
        bind.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', :seq)"),
                     {"seq": seq})


def upgrade() -> None:
    op.drop_index("ix_send_receipts_created_at", table_name="send_receipts")
    op.drop_index("ix_messages_sender_id", table_name="messages")
    if not _sqlite():
        op.drop_constraint("fk_messages_sender_id_accounts", "messages", type_="foreignkey")
        return
    seq = _message_counter()
    with op.batch_alter_table("messages", recreate="always",
                              table_kwargs={"sqlite_autoincrement": True}) as batch:
        batch.drop_constraint("fk_messages_sender_id_accounts", type_="foreignkey")
    _restore_message_counter(seq)
    with op.batch_alter_table("send_receipts", recreate="always",
                              table_kwargs={"sqlite_with_rowid": False}):
        pass


def downgrade() -> None:
    op.execute("UPDATE messages SET sender_id = NULL "
               "WHERE sender_id NOT IN (SELECT id FROM accounts)")
    if _sqlite():
        seq = _message_counter()
        with op.batch_alter_table("messages", recreate="always",
                                  table_kwargs={"sqlite_autoincrement": True}) as batch:
            batch.create_foreign_key("fk_messages_sender_id_accounts", "accounts",
                                     ["sender_id"], ["id"], ondelete="SET NULL")
        _restore_message_counter(seq)
        with op.batch_alter_table("send_receipts", recreate="always",
                                  table_kwargs={"sqlite_with_rowid": True}):
            pass
    else:
        op.create_foreign_key("fk_messages_sender_id_accounts", "messages", "accounts",
                              ["sender_id"], ["id"], ondelete="SET NULL")
    op.create_index("ix_messages_sender_id", "messages", ["sender_id"])
    op.create_index("ix_send_receipts_created_at", "send_receipts", ["created_at"])
