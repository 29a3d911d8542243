"""The database schema as typed SQLAlchemy models.

The hot path (store, fetch, ack) uses Core statements on ``Model.__table__`` rather than one
ORM object per message; the models exist so that Alembic can compare them with the
migrations (``alembic check``) and so the schema is readable in one place.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so that migrations (batch mode on SQLite) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid; BIGINT elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")

# Name keys compare and sort by code point on every backend (SQLite's BINARY collation): on
# PostgreSQL a linguistic default collation (en_US.UTF-8) would reorder pages and break the
# prefix range of searches ("a-*" would miss "a-b"), so the column collates "C" there.
NameKey = String(32).with_variant(String(32, collation="C"), "postgresql")


class _Utf8BytesOnPostgres(TypeDecorator):
    """A string that may hold U+0000 (the protocol allows it): PostgreSQL's text types
    cannot, so there it is stored as its UTF-8 bytes (bytea); elsewhere it is the plain type."""

    def load_dialect_impl(self, dialect):
        if dialect.name == "postgresql":
            return dialect.type_descriptor(LargeBinary())
        return super().load_dialect_impl(dialect)

    def process_bind_param(self, value, dialect):
        if value is not None and dialect.name == "postgresql":
            return value.encode("utf-8")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and dialect.name == "postgresql":
            return bytes(value).decode("utf-8")
        return value


class NulSafeText(_Utf8BytesOnPostgres):
    impl = Text
    cache_ok = True


class NulSafeString(_Utf8BytesOnPostgres):
    impl = String
    cache_ok = True


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AccountRow(Base):
    """An account. ``name_key`` (case-folded name) carries the uniqueness rule."""

    __tablename__ = "accounts"
    # AUTOINCREMENT: ids are never reused, so a new account with a deleted account's name can
    # never be mistaken for it.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(32))
    name_key: Mapped[str] = mapped_column(NameKey, unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[int] = mapped_column(BigInteger)  # ms since the Unix epoch, UTC
    last_login_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Bumped by an administrator's password reset: sessions that logged in before it end.
    password_version: Mapped[int] = mapped_column(Integer, server_default="0")


class MessageRow(Base):
    """A message accepted and not yet acknowledged by its recipient."""

    __tablename__ = "messages"
    # AUTOINCREMENT: message ids are never reused, so a client's "seen ids" stay valid.
    __table_args__ = (
        Index("ix_messages_recipient_id_id", "recipient_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    recipient_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    # The sender's name is copied so its messages stay deliverable after it is deleted. Its
    # id is a record of who sent it, not a reference: no foreign key and no index, since
    # keeping either up to date cost every send a B-tree page (migration 0004). After the
    # sender's deletion it names no account (ids are never reused); NULL in messages whose
    # sender was deleted before that migration.
    sender_id: Mapped[int | None] = mapped_column(Id, nullable=True)
    sender_name: Mapped[str] = mapped_column(String(32))
    sent_at: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(NulSafeText)


class SendReceiptRow(Base):
    """Remembers (sender, client_msg_id) -> message id, so a retried send stores nothing new.

    Kept apart from ``messages`` because it must outlive the message's acknowledgement.
    """

    __tablename__ = "send_receipts"
    # SQLite: the table is its primary key's B-tree (no rowid table beside it), so storing a
    # receipt writes one page, not two. Purges walk that key (no index on created_at).
    __table_args__ = {"sqlite_with_rowid": False}

    sender_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    client_msg_id: Mapped[str] = mapped_column(NulSafeString(64), primary_key=True)
    message_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)


accounts = AccountRow.__table__
messages = MessageRow.__table__
send_receipts = SendReceiptRow.__table__
