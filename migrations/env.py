"""Alembic environment: runs on the caller's connection when given one, else opens the URL.

The application passes its own connection in ``config.attributes["connection"]`` (so the
upgrade shares its settings and transaction); developers running ``alembic`` from a checkout
get the URL from ``-x db=PATH_OR_URL`` or alembic.ini.
"""

from alembic import context
from sqlalchemy import create_engine

from chatserver.storage.database import database_url
from chatserver.storage.tables import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("db") or config.get_main_option(
        "sqlalchemy.url"
    )
    engine = create_engine(database_url(url))
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")
run_migrations_online()
